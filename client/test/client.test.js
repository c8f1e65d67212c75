// The client library against the REAL local stack (target/debug/chat-local on port 0), in the
// ideal mode and in the AWS-like mode: real WebSockets, real fan-out, real history. No mocks.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { ChatClient } from '../src/index.js';
import { rawClient, recordingWebSocket, sleep, startStack, token, waitUntil } from './stack.js';

const SECRET = 'client-library-tests';

const MODES = [
  { name: 'ideal', args: [] },
  { name: 'aws-like', args: ['--aws-like'] },
];

/** Every public/private/system event a client delivers, in delivery order. */
function record(client) {
  const events = [];
  client.on('event', (event) => events.push(event));
  const states = [];
  client.on('state', ({ state }) => states.push(state));
  return { events, states };
}

/** THEN-helper: ids strictly increase per room, and no (room, id) is delivered twice. */
function assertOncePerIdInOrder(events) {
  const last = new Map();
  for (const event of events) {
    const previous = last.get(event.room) ?? 0;
    assert.ok(event.id > previous, `${event.room} id ${event.id} delivered after ${previous}: ${event.text}`);
    last.set(event.room, event.id);
  }
}

for (const mode of MODES) {
  describe(`client library, ${mode.name} mode`, () => {
    let plain;
    let authed;
    before(async () => {
      [plain, authed] = await Promise.all([
        startStack(mode.args),
        startStack([...mode.args, '--auth-jwt-secret', SECRET]),
      ]);
    });
    after(async () => {
      await Promise.all([plain?.stop(), authed?.stop()]);
    });

    test('requests resolve with their own answers and reject with the error frame code and message', async () => {
      // GIVEN alice and bob, each a ChatClient
      const { WebSocket } = recordingWebSocket();
      const alice = new ChatClient(plain.ws, { WebSocket });
      const bob = new ChatClient(plain.ws, { WebSocket });
      try {
        await Promise.all([alice.connect(), bob.connect()]);

        // WHEN alice sets her name
        const named = await alice.setName('alice');
        // THEN the ok answer says which events it recorded
        assert.equal(named.name, 'alice');
        assert.equal(alice.name, 'alice');
        assert.deepEqual(named.events.map((e) => e.room), ['lobby']);

        // WHEN she makes several requests of the same action at once
        const [ops, dev, page] = await Promise.all([alice.join('ops'), alice.join('dev'), alice.history({ after: 0 })]);
        // THEN each resolves with its own answer
        assert.equal(ops.room, 'ops');
        assert.equal(dev.room, 'dev');
        assert.ok(page.frames.some((f) => f.systemMessage === 'alice has joined the chat'));
        const [one, two] = await Promise.all([alice.sendPublic('one', 'ops'), alice.sendPublic('two', 'dev')]);
        assert.deepEqual([one.room, two.room], ['ops', 'dev']);
        assert.ok(Number.isInteger(one.id) && Number.isInteger(two.id));

        // WHEN bob asks for her name, in other letters, and sends an empty message
        await assert.rejects(bob.setName('ALICE'), (error) => {
          // THEN the promise rejects with the error frame's code and message
          assert.equal(error.code, 'name_taken');
          assert.match(error.message, /taken/);
          return true;
        });
        await bob.setName('bob');
        await assert.rejects(bob.sendPublic('   '), { code: 'invalid_message' });
        await assert.rejects(bob.sendPrivate('bob', 'me?'), { code: 'invalid_recipient' });
        const left = await alice.leave('dev');
        assert.equal(left.room, 'dev');
        assert.deepEqual([...alice.rooms], ['ops']);
      } finally {
        alice.close();
        bob.close();
      }
    });

    test('a change over the room\'s presence budget rejects with presence_rate_limited and a retry hint; the restore waits it out', async () => {
      // GIVEN a stack whose rooms may spend 1 @connections call a second on presence: each
      // second admits one change (an empty second admits any one), the rest are refused
      const budgeted = await startStack([...mode.args, '--room-presence-posts-per-second', '1']);
      const recorder = recordingWebSocket();
      const alice = new ChatClient(budgeted.ws, { WebSocket: recorder.WebSocket, initialBackoffMs: 50 });
      try {
        await alice.connect();
        await alice.setName('alice');
        // WHEN she renames three times at once
        const outcomes = await Promise.allSettled(['al1', 'al2', 'al3'].map((n) => alice.setName(n)));
        // THEN at most two seconds' worth got through, and each refusal says when to retry
        const refused = outcomes.filter((o) => o.status === 'rejected').map((o) => o.reason);
        assert.ok(refused.length >= 1, JSON.stringify(outcomes));
        for (const error of refused) {
          assert.equal(error.code, 'presence_rate_limited');
          assert.ok(Number.isInteger(error.retryAfterMs) && error.retryAfterMs >= 1 && error.retryAfterMs <= 1000, String(error.retryAfterMs));
        }
        const name = alice.name;
        // WHEN her connection drops: the restore's setName (a join of lobby) and join meet
        // the budget too (over it they go ahead unannounced; only renames and leaves are
        // refused)
        await alice.join('ops').catch(async (error) => {
          assert.equal(error.code, 'presence_rate_limited');
          await sleep(error.retryAfterMs);
          await alice.join('ops');
        });
        recorder.sockets[0].terminate();
        await waitUntil(() => recorder.sockets.length >= 2 && alice.state === 'open', 'alice restored', 15_000);
        // THEN she is back under her name, in both rooms: refusals were waited out, not fatal
        assert.equal(alice.name, name);
        assert.deepEqual([...alice.rooms], ['ops']);
        const sent = recorder.sockets.slice(1).flatMap((s) => s.sent.map((f) => JSON.parse(f)));
        assert.ok(sent.some((f) => f.action === 'setName' && f.name === name), JSON.stringify(sent));
        assert.ok(sent.some((f) => f.action === 'join' && f.room === 'ops'), JSON.stringify(sent));
      } finally {
        alice.close();
        await budgeted.stop();
      }
    });

    test('a connection dropped mid-conversation: the application sees every message once, in order', async () => {
      // GIVEN alice (the library, authenticated, so her private messages are history too) in
      // lobby and ops, and bob (a raw WebSocket) writing to both rooms and privately to her
      const recorder = recordingWebSocket();
      const alice = new ChatClient(authed.ws, {
        WebSocket: recorder.WebSocket,
        token: token(SECRET, 'user-alice'),
        // Long enough that bob writes while she is away (the catch-up must be exercised).
        initialBackoffMs: 800,
        // Small pages: the catch-up must follow `next`.
        historyPageLimit: 2,
      });
      const { events, states } = record(alice);
      const bob = await rawClient(`${authed.ws}?token=${token(SECRET, 'user-bob')}`);
      try {
        await alice.connect();
        await alice.setName('alice');
        await alice.join('ops');
        bob.send({ action: 'setName', name: 'bob' });
        bob.send({ action: 'join', room: 'ops' });
        await bob.waitFor((f) => f.joined?.room === 'ops', 'bob in ops');
        await waitUntil(() => alice.members.get('ops')?.includes('bob'), 'alice sees bob in ops');

        // WHEN bob writes 30 messages (lobby, ops, private, in turn) and alice's TCP
        // connection is dropped (no close frame) once she has seen 6 of them
        const sent = [];
        const fromBob = () => events.filter((e) => e.from === 'bob');
        const writer = (async () => {
          for (let i = 1; i <= 30; i += 1) {
            // requestIds tell bob which of his messages the chat stored: a private message to
            // alice while she is away is refused (unknown_recipient), and owed to nobody.
            const message = `m${i}`;
            const requestId = message;
            if (i % 3 === 1) bob.send({ action: 'sendPublic', message, requestId });
            else if (i % 3 === 2) bob.send({ action: 'sendPublic', room: 'ops', message, requestId });
            else bob.send({ action: 'sendPrivate', to: 'alice', message, requestId });
            sent.push({ text: message, kind: ['public lobby', 'public ops', 'private lobby'][(i - 1) % 3] });
            await sleep(100);
          }
        })();
        await waitUntil(() => fromBob().length >= 6, 'alice sees 6 of bob’s messages');
        recorder.sockets[0].terminate();
        await writer;
        const answered = (m) => bob.frames.find((f) => f.ok?.requestId === m || f.error?.requestId === m);
        await waitUntil(() => sent.every((m) => answered(m.text)), 'an answer to each of bob’s messages');
        const stored = sent.filter((m) => answered(m.text).ok);
        const refused = sent.filter((m) => answered(m.text).error);
        assert.ok(refused.every((m) => m.kind === 'private lobby' && answered(m.text).error.code === 'unknown_recipient'));

        // THEN she reconnects by herself and, once caught up, has every message exactly once
        await waitUntil(() => fromBob().length >= stored.length, 'alice has all of bob’s stored messages', 20_000);
        await sleep(500); // any late duplicate would arrive now
        // (order is per room: lobby's sequence holds its public and the private messages)
        const got = fromBob().map((e) => ({ text: e.body, kind: `${e.type} ${e.room}` }));
        for (const room of ['lobby', 'ops']) {
          const inRoom = (list) => list.filter((m) => m.kind.endsWith(room));
          assert.deepEqual(inRoom(got), inRoom(stored), `${room}: every message once, in order`);
        }
        assert.equal(got.length, stored.length);
        assertOncePerIdInOrder(events);
        // AND the drop really overlapped bob's writes: some came from history, some live
        assert.ok(recorder.sockets.length >= 2, 'alice reconnected');
        const reads = recorder.sockets.slice(1).flatMap((s) => s.sent.map((f) => JSON.parse(f)));
        const lobbyReads = reads.filter((f) => f.action === 'history' && f.room === 'lobby');
        assert.ok(lobbyReads.length >= 2, `the lobby's catch-up followed next: ${JSON.stringify(lobbyReads)}`);
        assert.ok(fromBob().some((e) => e.replayed), 'some messages were caught up from history');
        assert.ok(fromBob().some((e) => !e.replayed), 'some messages came live');
        assert.deepEqual(states.slice(0, 2), ['connecting', 'open']);
        assert.ok(states.includes('reconnecting'));
        assert.equal(alice.state, 'open');
        assert.deepEqual([...alice.rooms], ['ops']);
      } finally {
        alice.close();
        bob.close();
      }
    });

    test('a message both caught up from history and received live is delivered once', async () => {
      // GIVEN gina (the library) and hank (a raw WebSocket) in lobby
      const recorder = recordingWebSocket();
      const gina = new ChatClient(plain.ws, { WebSocket: recorder.WebSocket, initialBackoffMs: 50 });
      const { events } = record(gina);
      const hank = await rawClient(plain.ws);
      try {
        await gina.connect();
        await gina.setName('gina');
        hank.send({ action: 'setName', name: 'hank' });
        hank.send({ action: 'sendPublic', message: 'before', requestId: 'before' });
        await waitUntil(() => events.some((e) => e.body === 'before'), 'gina has hank’s first message');

        // WHEN her connection drops, and on the new one her catch-up read is held (a slow
        // network) until hank's next message has reached her live
        recorder.holdOnNext((frame) => frame.action === 'history');
        recorder.sockets[0].terminate();
        await waitUntil(() => recorder.sockets[1]?.held.length > 0, 'the catch-up read, held');
        hank.send({ action: 'sendPublic', message: 'overlap', requestId: 'overlap' });
        await hank.waitFor((f) => f.ok?.requestId === 'overlap', 'hank’s message stored');
        const fresh = recorder.sockets[1];
        await waitUntil(() => fresh.received.some((f) => f.publicMessage === 'hank: overlap'), 'the live frame');
        fresh.release();

        // THEN the history read returned it too, and the application saw it once
        await waitUntil(
          () => fresh.received.some((f) => f.history?.frames.some((h) => h.publicMessage === 'hank: overlap')),
          'the history page with it',
        );
        hank.send({ action: 'sendPublic', message: 'after', requestId: 'after' });
        await waitUntil(() => events.some((e) => e.body === 'after'), 'a later message');
        assert.deepEqual(
          events.filter((e) => e.from === 'hank').map((e) => e.body),
          ['before', 'overlap', 'after'],
        );
        assertOncePerIdInOrder(events);
      } finally {
        gina.close();
        hank.close();
      }
    });

    test('after a reconnect the name is taken back once the old connection lets it go', async () => {
      // GIVEN alice (no authentication: a name is freed only by the old connection's
      // $disconnect) and bob
      const recorder = recordingWebSocket();
      const alice = new ChatClient(plain.ws, { WebSocket: recorder.WebSocket, initialBackoffMs: 50, nameRetryMs: 100 });
      const { events } = record(alice);
      const bob = await rawClient(plain.ws);
      try {
        await alice.connect();
        await alice.setName('carol');
        bob.send({ action: 'setName', name: 'dave' });
        await waitUntil(() => alice.members.get('lobby')?.includes('dave'), 'carol sees dave');

        // WHEN alice's side loses the connection while the server still holds it (the close
        // reaches only the client), and bob writes meanwhile
        const old = recorder.sockets[0];
        old.onclose({ code: 1006, reason: '' });
        bob.send({ action: 'sendPublic', message: 'while you were away' });
        // THEN her new connection is refused the name, and retries
        await waitUntil(
          () => recorder.sockets[1]?.sent.filter((s) => JSON.parse(s).action === 'setName').length >= 2,
          'two setName attempts on the new connection',
        );
        assert.notEqual(alice.state, 'open');
        // WHEN the old connection finally goes (its $disconnect frees the name)
        old.terminate();
        // THEN she has her name back, and the message bob wrote meanwhile, once
        await waitUntil(() => alice.state === 'open', 'open again');
        assert.equal(alice.name, 'carol');
        await waitUntil(() => events.some((e) => e.body === 'while you were away'), 'the message from history');
        bob.send({ action: 'sendPublic', message: 'welcome back' });
        await waitUntil(() => events.some((e) => e.body === 'welcome back'), 'a live message');
        assert.equal(events.filter((e) => e.body === 'while you were away').length, 1);
        assertOncePerIdInOrder(events);
      } finally {
        alice.close();
        bob.close();
      }
    });

    test('a write in flight when the connection drops is resent and stored once (authenticated)', async () => {
      // GIVEN alice, authenticated (a write's idempotency scope is then her identity)
      const recorder = recordingWebSocket();
      const alice = new ChatClient(authed.ws, {
        WebSocket: recorder.WebSocket,
        token: token(SECRET, 'user-erin'),
        initialBackoffMs: 50,
      });
      try {
        await alice.connect();
        await alice.setName('erin');
        // WHEN she sends and her connection drops right after the frame left
        const sending = alice.sendPublic('exactly once please');
        await waitUntil(() => recorder.sockets[0].sent.some((s) => s.includes('exactly once please')), 'sent');
        recorder.sockets[0].terminate();
        // THEN the promise resolves (the request was resent with its requestId after the
        // reconnect), and history holds the message once
        const answer = await sending;
        assert.equal(answer.room, 'lobby');
        const resent = recorder.sockets.flatMap((s) => s.sent).filter((s) => s.includes('exactly once please'));
        assert.ok(resent.length >= 1);
        assert.ok(new Set(resent.map((s) => JSON.parse(s).requestId)).size === 1, 'one requestId');
        const page = await alice.history({ after: 0, limit: 100 });
        assert.equal(page.frames.filter((f) => f.publicMessage === 'erin: exactly once please').length, 1);
      } finally {
        alice.close();
      }
    });

    test('what cannot succeed is not retried: a refused token (401) and a frame too large (1009)', async () => {
      // GIVEN a client with a forged token
      const forged = recordingWebSocket();
      const intruder = new ChatClient(authed.ws, { WebSocket: forged.WebSocket, token: token('wrong', 'x'), initialBackoffMs: 20 });
      // WHEN it connects THEN it closes for good, saying why
      await assert.rejects(intruder.connect(), (error) => {
        assert.equal(error.code, 'closed');
        assert.match(error.message, /401/);
        return true;
      });
      assert.equal(intruder.state, 'closed');

      // GIVEN a named client WHEN it sends a frame over API Gateway's 32 KB
      const big = recordingWebSocket();
      const frank = new ChatClient(plain.ws, { WebSocket: big.WebSocket, initialBackoffMs: 20 });
      const states = [];
      frank.on('state', (s) => states.push(s));
      await frank.connect();
      await frank.setName('frank');
      await assert.rejects(frank.sendPublic('x'.repeat(40 * 1024)), { code: 'closed' });
      // THEN the 1009 close ends the session instead of reconnecting
      const closed = states.at(-1);
      assert.equal(closed.state, 'closed');
      assert.equal(closed.code, 1009);
      await sleep(200); // ten times the backoff: a reconnect would have started
      assert.equal(forged.sockets.length, 1);
      assert.equal(big.sockets.length, 1);
    });
  });
}
