// The chat's client library: one ChatClient per person, in a browser or in Node.
//
// It owns what every client of the chat must get right (README, "Catch-up that loses
// nothing"): connecting and reconnecting with backoff, taking the name back after a reconnect
// (retrying `name_taken` while the old connection's $disconnect has not run), rejoining rooms,
// catching every room up from the last id seen via `history` and `next`, and delivering each
// event to the application exactly once and in id order per room. Requests return promises,
// matched to their answers by `requestId` (the wire contract: README, "Wire protocol").
//
// No runtime dependencies: the WebSocket constructor is an option (default
// globalThis.WebSocket), so browsers, Node 22+ and the `ws` package all work.

/** The connection states, in the order a session normally goes through them. */
export const STATES = Object.freeze(['connecting', 'open', 'reconnecting', 'closed']);

const DEFAULTS = Object.freeze({
  // First reconnect delay, growth factor and cap: 250 ms, 500 ms, 1 s, … 10 s, each drawn
  // between half and all of its value (jitter), so clients dropped together do not come back
  // together.
  initialBackoffMs: 250,
  maxBackoffMs: 10_000,
  backoffFactor: 2,
  // `name_taken` after a reconnect means the old connection still holds the name until its
  // $disconnect runs (immediate on a clean close, later on a lost one): retry this often,
  // for this long.
  nameRetryMs: 500,
  nameRetryForMs: 60_000,
  // How long a frame that follows a gap in a room's ids waits for the missing id to arrive
  // live before the gap is filled from history (the missing id may be an event this client
  // cannot see, e.g. someone else's private message in lobby's sequence).
  gapWaitMs: 300,
  historyPageLimit: 100,
  requestTimeoutMs: 15_000,
  // An internal request refused with `rate_limited` or `internal_error` is retried after this.
  internalRetryMs: 400,
  // Ask for batched frames (`?batch=1`): a busy room's events come several to a frame,
  // `{"batch":[frame, …]}`, each unpacked here into the same path as a single frame.
  batch: true,
});

const LOBBY = 'lobby';
const SEQUENCE_KEYS = ['systemMessage', 'publicMessage', 'privateMessage'];

/** A refused or failed request: `code` is the error frame's code (README, "Error frames"),
 * or one of the library's own: `timeout`, `connection_lost`, `closed`. */
export class ChatError extends Error {
  constructor(code, message, { action, requestId, retryAfterMs } = {}) {
    super(message);
    this.name = 'ChatError';
    this.code = code;
    if (action !== undefined) this.action = action;
    if (requestId !== undefined) this.requestId = requestId;
    // `presence_rate_limited`: when the room's presence budget has room again.
    if (Number.isInteger(retryAfterMs)) this.retryAfterMs = retryAfterMs;
  }
}

/** One person's session with the chat. */
export class ChatClient {
  /**
   * @param {string} url the WebSocket URL (`ws://127.0.0.1:8080/prod`, or the stack's Output)
   * @param {object} [options] see index.d.ts (`ChatClientOptions`)
   */
  constructor(url, options = {}) {
    if (typeof url !== 'string' || url === '') throw new TypeError('ChatClient needs a WebSocket URL');
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('No WebSocket constructor: pass options.WebSocket (e.g. the `ws` package)');
    }
    this.random = options.random ?? Math.random;
    this.state = 'idle';
    /** The name this session holds (null before the first successful setName). */
    this.name = null;
    /** Rooms joined besides lobby. */
    this.rooms = new Set();
    /** room -> member names, from the latest `members` frame. */
    this.members = new Map();

    this._listeners = new Map();
    this._ws = null;
    this._generation = 0; // bumped per connection attempt: stale callbacks check it
    this._attempt = 0;
    this._reconnectTimer = null;
    this._stopped = false;
    this._everOpened = false;
    this._pending = new Map(); // requestId -> request
    this._queue = []; // requests made while not open, sent once the session is restored
    this._echoSeen = false; // the server echoes requestIds (else answers are matched by action)
    this._idPrefix = randomPrefix(this.random);
    this._idCounter = 0;
    this._sendCounter = 0; // orders sent requests, for answers without a requestId
    this._roomState = new Map(); // room -> sequence state (see _room)
    this._membersId = new Map(); // room -> id of the latest members frame applied
  }

  // ---- events -------------------------------------------------------------------------

  /** Subscribes to an event (see index.d.ts, `ChatEvents`); returns the unsubscribe function. */
  on(type, listener) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  _emit(type, payload) {
    for (const listener of [...(this._listeners.get(type) ?? [])]) {
      try {
        listener(payload);
      } catch (error) {
        // An application's listener throwing must not break delivery to the others, nor the
        // library's own state; report it where a developer will see it.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  _setState(state, detail = {}) {
    if (this.state === state && state !== 'reconnecting') return;
    this.state = state;
    this._emit('state', { state, ...detail });
  }

  // ---- connection ---------------------------------------------------------------------

  /** Opens the connection (and keeps it open until `close()`); resolves once it is open. */
  connect() {
    if (this._stopped) return Promise.reject(new ChatError('closed', 'This client was closed'));
    if (this.state === 'idle') this._open();
    if (this.state === 'open') return Promise.resolve();
    return new Promise((resolve, reject) => {
      const off = this.on('state', ({ state, reason }) => {
        if (state === 'open') {
          off();
          resolve();
        } else if (state === 'closed') {
          off();
          reject(new ChatError('closed', reason ?? 'The connection closed'));
        }
      });
    });
  }

  /** Closes for good: no reconnect; pending requests are rejected with `closed`. */
  close() {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    this._generation += 1;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000, 'client closed');
      } catch {
        // Already closing: nothing to do.
      }
    }
    this._failAll(new ChatError('closed', 'The client was closed'), () => true);
    for (const st of this._roomState.values()) clearTimeout(st.gapTimer);
    this._setState('closed', { reason: 'closed by the application' });
  }

  _open() {
    const generation = ++this._generation;
    this._setState(this._everOpened ? 'reconnecting' : 'connecting', { attempt: this._attempt });
    let url = this.url;
    if (this.options.token) {
      url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(this.options.token);
    }
    if (this.options.batch) {
      url += (url.includes('?') ? '&' : '?') + 'batch=1';
    }
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (error) {
      // A malformed URL cannot get better by retrying.
      this._stopped = true;
      this._setState('closed', { reason: `Cannot open ${this.url}: ${error.message}` });
      return;
    }
    this._ws = ws;
    let refused = null; // set when the handshake was refused in a way a retry cannot fix
    ws.onopen = () => {
      if (generation !== this._generation) return;
      this._restore(generation);
    };
    ws.onmessage = (event) => {
      if (generation !== this._generation) return;
      const data = typeof event.data === 'string' ? event.data : String(event.data);
      let frame;
      try {
        frame = JSON.parse(data);
      } catch {
        return; // not ours to interpret
      }
      if (frame === null || typeof frame !== 'object') return;
      if (Array.isArray(frame.batch)) {
        // A batch is its frames in id order, each exactly as it would come alone: the same
        // dedupe and ordering path.
        for (const inner of frame.batch) {
          if (generation !== this._generation) return;
          if (inner !== null && typeof inner === 'object') this._onFrame(inner);
        }
        return;
      }
      this._onFrame(frame);
    };
    ws.onerror = (event) => {
      // Browsers hide a refused handshake's status; the `ws` package and Node's WebSocket say
      // "Unexpected server response: 401". 401 and 403 are $connect refusing the token.
      const text = String(event?.message ?? event?.error?.message ?? '');
      if (/\b(401|403)\b/.test(text)) refused = `The chat refused the connection (${text.trim()}): check the token`;
    };
    ws.onclose = (event) => {
      if (generation !== this._generation) return;
      this._ws = null;
      const code = event?.code;
      if (code === 1009) refused = 'The chat closed the connection: a frame was too large (1009)';
      if (this._stopped) return;
      if (refused) {
        this._stopped = true;
        this._failAll(new ChatError('closed', refused), () => true);
        this._setState('closed', { reason: refused, code });
        return;
      }
      this._failAll(
        new ChatError(
          'connection_lost',
          'The connection closed before the chat answered; the request may or may not have been done.',
        ),
        // The restore's own requests belong to this connection: the next restore sends anew.
        (request) => request.internal || !this._resendable(request),
      );
      for (const request of this._pending.values()) {
        if (!request.sent) continue; // still in the queue
        // Resent (same requestId) once the session is restored.
        request.sent = false;
        clearTimeout(request.timer);
        this._queue.push(request);
      }
      const base = Math.min(
        this.options.maxBackoffMs,
        this.options.initialBackoffMs * this.options.backoffFactor ** this._attempt,
      );
      const delayMs = Math.round(base / 2 + (this.random() * base) / 2);
      this._attempt += 1;
      this._setState('reconnecting', { attempt: this._attempt, delayMs, code, reason: event?.reason || undefined });
      this._reconnectTimer = setTimeout(() => this._open(), delayMs);
    };
  }

  /** A write request is resent on a new connection only when the server dedupes it there:
   * its idempotency scope is the identity, which exists only with a token. Reads are always. */
  _resendable(request) {
    return request.action === 'history' || Boolean(this.options.token);
  }

  /** After (re)connecting: the name back, the rooms back, every room caught up; then open. */
  async _restore(generation) {
    const live = () => generation === this._generation && !this._stopped;
    try {
      if (this.name !== null) {
        const deadline = Date.now() + this.options.nameRetryForMs;
        for (;;) {
          try {
            await this._internal(generation, 'setName', { name: this.name });
            break;
          } catch (error) {
            if (!live()) return;
            if (error.code === 'name_taken' && Date.now() < deadline) {
              await sleep(this.options.nameRetryMs);
              if (!live()) return;
              continue;
            }
            // The name is gone (taken for good, or refused): say so, carry on without it.
            this._emit('error', { code: error.code, message: error.message, action: 'setName' });
            this.name = null;
            break;
          }
        }
      }
      if (this.name !== null) {
        // Join first, then read history: a message committed after the history read reaches
        // this connection live only if it is a member by then (README).
        for (const room of [...this.rooms]) {
          try {
            await this._internal(generation, 'join', { room });
          } catch (error) {
            if (!live()) return;
            this._emit('error', { code: error.code, message: error.message, action: 'join', room });
            this._forgetRoom(room);
          }
        }
        for (const room of [LOBBY, ...this.rooms]) {
          const st = this._roomState.get(room);
          if (st && st.delivered !== null) this._fill(room, generation);
        }
      }
      if (!live()) return;
      this._attempt = 0;
      this._everOpened = true;
      this._setState('open');
      const queue = this._queue.splice(0);
      for (const request of queue) this._transmit(request);
    } catch (error) {
      if (live()) this._emit('error', { code: error.code ?? 'internal', message: String(error.message ?? error) });
    }
  }

  // ---- requests -----------------------------------------------------------------------

  /** Takes a name (and joins lobby); renames when sent again. Resolves with the `ok` answer. */
  async setName(name) {
    const answer = await this._request('setName', { name });
    this.name = answer?.name ?? name;
    return answer;
  }

  /** Says something to a room (default lobby). Resolves with `{room, id}`. */
  sendPublic(message, room = LOBBY) {
    return this._request('sendPublic', room === LOBBY ? { message } : { message, room });
  }

  /** Says something to one member, by name. Resolves with `{id}` (in lobby's sequence). */
  sendPrivate(to, message) {
    return this._request('sendPrivate', { to, message });
  }

  /** Joins a room; it is rejoined after every reconnect until left. Resolves with `{room, id}`. */
  async join(room) {
    const answer = await this._request('join', { room });
    this.rooms.add(room);
    const st = this._room(room);
    // Deliver from the join itself on: its id is this connection's start in the room.
    if (st.delivered === null && Number.isInteger(answer?.id)) {
      st.delivered = answer.already ? answer.id : answer.id - 1;
      this._drain(room);
    }
    return answer;
  }

  /** Leaves a room. Resolves with `{room, id}`. */
  async leave(room) {
    const answer = await this._request('leave', { room });
    this._forgetRoom(room);
    return answer;
  }

  /** Reads a page of a room's history (`{room, before, after, limit}`): scroll-back. Resolves
   * with `{frames, next}`; the frames are not delivered as events (they are the past). */
  history({ room = LOBBY, before, after, limit } = {}) {
    const fields = { room };
    if (before !== undefined) fields.before = before;
    if (after !== undefined) fields.after = after;
    if (limit !== undefined) fields.limit = limit;
    return this._request('history', fields);
  }

  _request(action, fields) {
    if (this._stopped) return Promise.reject(new ChatError('closed', 'The client was closed', { action }));
    if (this.state === 'idle') this._open();
    return this._newRequest(action, fields, (request) => {
      if (this.state === 'open' && this._ws) this._transmit(request);
      else this._queue.push(request);
    });
  }

  /** A request of the restore sequence: sent now on this connection, never queued; retried
   * on `rate_limited`, `presence_rate_limited` (after its `retryAfterMs`) and `internal_error`
   * (all mean nothing was done, or it may be resent with the same requestId). */
  async _internal(generation, action, fields) {
    for (;;) {
      if (generation !== this._generation) throw new ChatError('connection_lost', 'reconnecting');
      try {
        return await this._newRequest(action, fields, (request) => this._transmit(request), true);
      } catch (error) {
        if (error.code === 'presence_rate_limited') {
          // The room's presence budget for this second is spent: its next second admits it.
          await sleep(error.retryAfterMs ?? this.options.internalRetryMs);
          continue;
        }
        if (error.code !== 'rate_limited' && error.code !== 'internal_error') throw error;
        await sleep(this.options.internalRetryMs);
      }
    }
  }

  _newRequest(action, fields, dispatch, internal = false) {
    const requestId = `${this._idPrefix}-${++this._idCounter}`;
    return new Promise((resolve, reject) => {
      const request = {
        requestId,
        action,
        internal,
        frame: JSON.stringify({ action, ...fields, requestId }),
        resolve,
        reject,
        sent: false,
        timer: null,
      };
      this._pending.set(requestId, request);
      dispatch(request);
    });
  }

  _transmit(request) {
    if (!this._pending.has(request.requestId)) return;
    const ws = this._ws;
    if (!ws) {
      this._queue.push(request);
      return;
    }
    try {
      ws.send(request.frame);
    } catch {
      // The socket is closing: onclose requeues or fails it.
      return;
    }
    request.sent = true;
    request.sentAt = ++this._sendCounter;
    clearTimeout(request.timer);
    request.timer = setTimeout(() => {
      this._settle(request, new ChatError('timeout', `No answer to ${request.action} within ${this.options.requestTimeoutMs} ms`, request));
    }, this.options.requestTimeoutMs);
  }

  _settle(request, error, value) {
    if (!this._pending.delete(request.requestId)) return;
    clearTimeout(request.timer);
    const queued = this._queue.indexOf(request);
    if (queued >= 0) this._queue.splice(queued, 1);
    if (error) request.reject(error);
    else request.resolve(value);
  }

  _failAll(error, which) {
    for (const request of [...this._pending.values()]) {
      if (which(request)) {
        this._settle(request, new ChatError(error.code, error.message, { action: request.action, requestId: request.requestId }));
      }
    }
  }

  /** The pending request an answer belongs to: by requestId; from a server that does not echo
   * requestIds (before the contract), the oldest sent request of that action. */
  _answerFor(requestId, action) {
    if (typeof requestId === 'string') {
      this._echoSeen = true;
      return this._pending.get(requestId) ?? null;
    }
    if (this._echoSeen || !action) return null;
    let oldest = null;
    for (const request of this._pending.values()) {
      if (request.sent && request.action === action && (!oldest || request.sentAt < oldest.sentAt)) oldest = request;
    }
    return oldest;
  }

  // ---- frames -------------------------------------------------------------------------

  _onFrame(frame) {
    if (frame.error && typeof frame.error === 'object') {
      const { code, message, action, requestId, retryAfterMs } = frame.error;
      const request = this._answerFor(requestId, action);
      if (request) {
        this._settle(request, new ChatError(code, message, { action: request.action, requestId: request.requestId, retryAfterMs }));
      } else {
        this._emit('error', { code, message, action });
      }
      return;
    }
    if (frame.ok && typeof frame.ok === 'object') {
      const request = this._answerFor(frame.ok.requestId, frame.ok.action);
      if (request) this._settle(request, null, frame.ok);
      return;
    }
    for (const key of ['joined', 'left']) {
      if (frame[key] && typeof frame[key] === 'object') {
        const request = this._answerFor(frame[key].requestId, key === 'joined' ? 'join' : 'leave');
        if (request) this._settle(request, null, frame[key]);
        return;
      }
    }
    if (frame.history && typeof frame.history === 'object') {
      const request = this._answerFor(frame.history.requestId, 'history');
      const page = { frames: frame.history.frames ?? [], next: frame.history.next ?? null };
      if (request) this._settle(request, null, page);
      return;
    }
    if (Array.isArray(frame.members)) {
      this._onMembers(frame);
      return;
    }
    if (typeof frame.message === 'string' && !('id' in frame)) {
      // API Gateway's own frames: {"message":"Too Many Requests",…} for a throttled frame,
      // {"message":"Internal server error","connectionId":…,"requestId":…} for a failed
      // integration. Their requestId is API Gateway's, not ours: the request they answer is
      // unknown, and its promise times out.
      const code = frame.message === 'Too Many Requests' ? 'throttled' : 'gateway_error';
      this._emit('error', { code, message: frame.message });
      return;
    }
    if (SEQUENCE_KEYS.some((key) => typeof frame[key] === 'string')) this._accept(frame, false);
  }

  _onMembers(frame) {
    const room = frame.room ?? LOBBY;
    if (room !== LOBBY && !this.rooms.has(room) && !this._joining(room)) return;
    const id = Number.isInteger(frame.id) ? frame.id : null;
    const last = this._membersId.get(room);
    // A snapshot, not an event: applied only if newer than the last list applied. A batch
    // redelivered at other boundaries brings lists with older ids: stale, not news.
    if (id !== null && last !== undefined && id <= last) return;
    if (id !== null) this._membersId.set(room, id);
    this.members.set(room, frame.members.slice());
    this._emit('members', { room, members: frame.members.slice(), id, ts: frame.ts ?? null });
  }

  _joining(room) {
    for (const request of this._pending.values()) {
      if (request.action === 'join' && JSON.parse(request.frame).room === room) return true;
    }
    return false;
  }

  _room(room) {
    let st = this._roomState.get(room);
    if (!st) {
      // delivered: the highest id delivered (or known to be invisible to this client);
      // buffer: frames after a gap, by id; filling: a history read is in flight.
      st = { delivered: null, buffer: new Map(), gapTimer: null, filling: false, refill: false };
      this._roomState.set(room, st);
    }
    return st;
  }

  _forgetRoom(room) {
    this.rooms.delete(room);
    const st = this._roomState.get(room);
    if (st) clearTimeout(st.gapTimer);
    this._roomState.delete(room);
    this._membersId.delete(room);
    this.members.delete(room);
  }

  /** A sequence frame (live, or from a catch-up history page): delivered when it is the next
   * id, dropped when already delivered, otherwise held until the gap before it is resolved. */
  _accept(frame, replayed) {
    if (!Number.isInteger(frame.id)) {
      // A frame without an id (a server older than ids) cannot be ordered: pass it through.
      this._deliver(frame, frame.room ?? LOBBY, replayed);
      return;
    }
    // Private messages have no room: they are numbered in lobby's sequence.
    const room = typeof frame.privateMessage === 'string' ? LOBBY : (frame.room ?? LOBBY);
    if (room !== LOBBY && !this.rooms.has(room) && !this._joining(room)) return;
    const st = this._room(room);
    if (st.delivered === null) st.delivered = frame.id - 1; // first frame of a new member
    if (frame.id <= st.delivered) return; // a redelivery, or an id already resolved
    const held = st.buffer.get(frame.id);
    // Live and history frames of one event are identical (presence included: one
    // systemMessage per change, README "Guarantees"); the first copy held is kept.
    if (!held) st.buffer.set(frame.id, { frame, replayed });
    this._drain(room);
  }

  _drain(room) {
    const st = this._roomState.get(room);
    if (!st || st.delivered === null) return;
    while (st.buffer.has(st.delivered + 1)) {
      const next = st.delivered + 1;
      const { frame, replayed } = st.buffer.get(next);
      st.buffer.delete(next);
      st.delivered = next;
      this._deliver(frame, room, replayed);
    }
    clearTimeout(st.gapTimer);
    st.gapTimer = null;
    if (st.buffer.size > 0 && !st.filling && this._ws) {
      st.gapTimer = setTimeout(() => {
        st.gapTimer = null;
        this._fill(room, this._generation);
      }, this.options.gapWaitMs);
    }
  }

  /** Reads the room's history after the last delivered id, following `next`, and releases
   * everything up to the newest id known to be committed: catch-up after a reconnect, and
   * the resolution of a gap that did not fill live. */
  async _fill(room, generation) {
    const st = this._roomState.get(room);
    if (!st || st.delivered === null) return;
    if (st.filling) {
      st.refill = true;
      return;
    }
    st.filling = true;
    try {
      do {
        st.refill = false;
        // Every held frame was committed before this read starts, so the read sees every
        // event up to the highest held id (a cursor never skips: README, "Ordering guarantee").
        let upTo = Math.max(st.delivered, ...st.buffer.keys());
        let request = { room, after: st.delivered, limit: this.options.historyPageLimit };
        for (;;) {
          const page = await this._internal(generation, 'history', request);
          if (this._roomState.get(room) !== st) return; // left meanwhile
          this._emit('history', { room, frames: page.frames, next: page.next, catchUp: true });
          for (const frame of page.frames) {
            if (Number.isInteger(frame.id)) upTo = Math.max(upTo, frame.id);
            this._accept(frame, true);
          }
          if (!page.next) break;
          const { action: _action, requestId: _requestId, ...rest } = page.next;
          request = rest;
        }
        // Ids up to upTo that history did not return are events this client may not see.
        const held = [...st.buffer.keys()].filter((id) => id <= upTo).sort((a, b) => a - b);
        for (const id of held) {
          const { frame, replayed } = st.buffer.get(id);
          st.buffer.delete(id);
          if (id > st.delivered) {
            st.delivered = id;
            this._deliver(frame, room, replayed);
          }
        }
        st.delivered = Math.max(st.delivered, upTo);
      } while (st.refill);
    } catch {
      // The connection went: the restore after the reconnect fills again from `delivered`.
    } finally {
      st.filling = false;
      if (this._roomState.get(room) === st) this._drain(room);
    }
  }

  _deliver(frame, room, replayed) {
    const base = { room, id: frame.id ?? null, ts: frame.ts ?? null, replayed };
    let event;
    if (typeof frame.publicMessage === 'string') {
      event = { type: 'public', ...base, text: frame.publicMessage, ...this._split(frame.publicMessage, room) };
    } else if (typeof frame.privateMessage === 'string') {
      event = { type: 'private', ...base, text: frame.privateMessage, ...this._split(frame.privateMessage, LOBBY) };
      if (typeof frame.to === 'string') event.to = frame.to;
    } else {
      event = { type: 'system', ...base, text: frame.systemMessage, ...classify(frame.systemMessage) };
    }
    this._emit(event.type, event);
    this._emit('event', event);
  }

  /** "alice: hi" -> from "alice", body "hi": the longest known member name followed by ": "
   * (names may contain ": "), else up to the first ": ". */
  _split(text, room) {
    let from = null;
    for (const names of [this.members.get(room) ?? [], this.members.get(LOBBY) ?? []]) {
      for (const name of names) {
        if (text.startsWith(name + ': ') && (from === null || name.length > from.length)) from = name;
      }
    }
    if (from === null) {
      const at = text.indexOf(': ');
      if (at < 0) return { from: null, body: text };
      from = text.slice(0, at);
    }
    return { from, body: text.slice(from.length + 2) };
  }
}

/** A systemMessage's kind: join, leave, rename, or other (a text the library does not know). */
function classify(text) {
  let m = /^(.*) has joined the chat$/s.exec(text);
  if (m) return { kind: 'join', name: m[1] };
  m = /^(.*) has left the chat$/s.exec(text);
  if (m) return { kind: 'leave', name: m[1] };
  m = /^(.*) is now known as (.*)$/s.exec(text);
  if (m) return { kind: 'rename', name: m[1], newName: m[2] };
  return { kind: 'other' };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** 12 characters of [a-z0-9]: requestIds are `<prefix>-<counter>`, unique per client. */
function randomPrefix(random) {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID().replaceAll('-', '').slice(0, 16);
  let s = '';
  while (s.length < 16) s += Math.floor(random() * 36).toString(36);
  return s;
}
