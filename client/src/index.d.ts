// Types of the chat's client library (src/index.js).

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export const STATES: readonly ConnectionState[];

/** The subset of the WebSocket interface the client uses (browsers, Node, the `ws` package). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
}

export interface ChatClientOptions {
  /** Sent as `?token=` on every connect (the chat's `$connect` authentication). With a token,
   * write requests in flight when a connection drops are resent on the next one (same
   * requestId: the server stores them once per identity); without one they are rejected
   * with `connection_lost`, since the server's idempotency scope is then the old connection. */
  token?: string;
  /** Ask for batched frames with `?batch=1` on every connect (default true): a busy room's
   * events then come several to a WebSocket frame, `{"batch":[frame, …]}`, which the library
   * unpacks — the application sees the same events either way. */
  batch?: boolean;
  /** The WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** First reconnect delay (default 250 ms), growth factor (2) and cap (10,000 ms); each delay
   * is drawn between half and all of its value. */
  initialBackoffMs?: number;
  backoffFactor?: number;
  maxBackoffMs?: number;
  /** After a reconnect, `name_taken` is retried every `nameRetryMs` (500) for `nameRetryForMs`
   * (60,000): the old connection holds the name until its `$disconnect` has run. */
  nameRetryMs?: number;
  nameRetryForMs?: number;
  /** How long a frame after a gap in its room's ids waits for the gap to fill live before it
   * is filled from history (default 300 ms). */
  gapWaitMs?: number;
  /** `limit` of the history pages read to catch up (1–100, default 100). */
  historyPageLimit?: number;
  /** A request without an answer this long is rejected with `timeout` (default 15,000 ms). */
  requestTimeoutMs?: number;
  /** Delay before an internal request refused with `rate_limited`/`internal_error` is retried. */
  internalRetryMs?: number;
  /** Source of randomness for the jitter (default Math.random). */
  random?: () => number;
}

/** A refused or failed request. `code` is the error frame's (README, "Error frames") or the
 * library's own: `timeout`, `connection_lost` (the request may or may not have been done),
 * `closed`. */
export class ChatError extends Error {
  code: string;
  action?: string;
  requestId?: string;
  /** `presence_rate_limited`: ms until the room's presence budget admits the change again. */
  retryAfterMs?: number;
}

interface EventBase {
  /** The room whose sequence the event is in (private messages: `lobby`). */
  room: string;
  /** The event id, dense per room. */
  id: number | null;
  /** Commit time, ms since the epoch. */
  ts: number | null;
  /** True when it came from a history read (catch-up) rather than live. */
  replayed: boolean;
}

export interface PublicMessageEvent extends EventBase {
  type: 'public';
  /** The frame's text as sent: "alice: hello". */
  text: string;
  from: string | null;
  body: string;
}

export interface PrivateMessageEvent extends EventBase {
  type: 'private';
  text: string;
  from: string | null;
  body: string;
  /** Present on private messages read back from history (your own sent ones). */
  to?: string;
}

export interface SystemEvent extends EventBase {
  type: 'system';
  text: string;
  /** join/leave/rename of one person (every presence change has its own message); `other` for any other text. */
  kind: 'join' | 'leave' | 'rename' | 'other';
  name?: string;
  newName?: string;
}

export type ChatEvent = PublicMessageEvent | PrivateMessageEvent | SystemEvent;

export interface MembersEvent {
  room: string;
  members: string[];
  id: number | null;
  ts: number | null;
}

export interface StateEvent {
  state: ConnectionState;
  attempt?: number;
  /** Before the next reconnect attempt. */
  delayMs?: number;
  /** The close code of the connection that ended. */
  code?: number;
  reason?: string;
}

export interface HistoryFrame {
  publicMessage?: string;
  systemMessage?: string;
  privateMessage?: string;
  to?: string;
  room?: string;
  id: number;
  ts: number;
}

export interface HistoryPage {
  frames: HistoryFrame[];
  /** The request that continues; null when everything up to now was returned. */
  next: { room: string; after?: number; before?: number; limit: number } | null;
}

export interface ChatEvents {
  state: StateEvent;
  members: MembersEvent;
  public: PublicMessageEvent;
  private: PrivateMessageEvent;
  system: SystemEvent;
  /** Every public, private and system event, in delivery order. */
  event: ChatEvent;
  /** Every history page read while catching up (scroll-back pages are the promise's value). */
  history: HistoryPage & { room: string; catchUp: boolean };
  /** Error frames that answer no pending request, and failures of the restore (the name could
   * not be taken back, a room could not be rejoined), and API Gateway's throttling frames. */
  error: { code: string; message: string; action?: string; room?: string };
}

export interface SetNameAnswer {
  action: 'setName';
  requestId: string;
  name: string;
  events: { room: string; id: number }[];
}

export interface SendAnswer {
  action: 'sendPublic' | 'sendPrivate';
  requestId: string;
  room?: string;
  id: number;
}

export interface RoomAnswer {
  room: string;
  id: number;
  already?: boolean;
  requestId?: string;
}

export class ChatClient {
  constructor(url: string, options?: ChatClientOptions);
  readonly url: string;
  readonly state: 'idle' | ConnectionState;
  /** The name this session holds (taken back after every reconnect). */
  readonly name: string | null;
  /** Rooms joined besides lobby (rejoined after every reconnect). */
  readonly rooms: ReadonlySet<string>;
  /** Each room's latest member list. */
  readonly members: ReadonlyMap<string, string[]>;

  on<K extends keyof ChatEvents>(type: K, listener: (event: ChatEvents[K]) => void): () => void;
  /** Opens the connection; resolves once open (rejects if it closes for good first). */
  connect(): Promise<void>;
  /** Closes for good: no reconnect; pending requests reject with `closed`. */
  close(): void;

  setName(name: string): Promise<SetNameAnswer>;
  sendPublic(message: string, room?: string): Promise<SendAnswer>;
  sendPrivate(to: string, message: string): Promise<SendAnswer>;
  join(room: string): Promise<RoomAnswer>;
  leave(room: string): Promise<RoomAnswer>;
  history(query?: { room?: string; before?: number; after?: number; limit?: number }): Promise<HistoryPage>;
}
