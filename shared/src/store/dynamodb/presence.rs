//! A room's presence budget ([`crate::presence`]): one counter item per room and second in the
//! connections table (`PRESENCE#<room>` / `W#<second>`, [`crate::keys`]), charged with one
//! conditional `ADD`, in the room's own partition (one room's presence never lands on another's).

use super::expr::{key, n, Expr};
use super::DynamoStore;
use crate::keys;
use crate::presence::{self, BudgetVerdict, PresenceBudget};
use crate::store::StoreError;

impl DynamoStore {
    /// Reads the room's counter for the change's cost, then adds the cost to the window's
    /// count if the window can still pay for it: a `GetItem` and an `UpdateItem` (none in a
    /// large room, whose presence is free).
    pub(super) async fn charge_presence(
        &self,
        room: &str,
        budget: PresenceBudget,
        now_ms: i64,
    ) -> Result<BudgetVerdict, StoreError> {
        if budget.is_off() {
            return Ok(BudgetVerdict::Allowed);
        }
        let counter = self.read_counter(room).await?;
        let cost = PresenceBudget::cost(counter.members, counter.large);
        if cost == 0 {
            return Ok(BudgetVerdict::Allowed);
        }
        let (index, expires_at) = presence::window(now_ms);
        let update = Expr::new("ADD #n :cost SET #exp = :exp")
            .name("#n", keys::LIMIT_COUNT)
            .value(":cost", n(cost))
            .value(":exp", n(expires_at));
        // An empty window admits any one change, so every room can change once a second.
        let cond = Expr::new("attribute_not_exists(#n) OR #n <= :upto")
            .name("#n", keys::LIMIT_COUNT)
            .value(":upto", n(budget.admits_up_to(cost)));
        let charged = self
            .update_if(
                "UpdateItem presence budget",
                key(
                    keys::presence_budget_pk(room),
                    &keys::presence_window_sk(index),
                ),
                update,
                cond,
            )
            .await?;
        Ok(if charged {
            BudgetVerdict::Allowed
        } else {
            BudgetVerdict::Exceeded {
                retry_after_ms: presence::retry_after_ms(now_ms),
            }
        })
    }
}
