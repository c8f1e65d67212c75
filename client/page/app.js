// The chat page: a thin view over the client library (client.js). Every name and message is
// put on the page with textContent, never as HTML.

import { ChatClient } from './client.js';

const params = new URLSearchParams(location.search);
const path = document.querySelector('meta[name="chat-websocket-path"]')?.content ?? '/prod';
const wsUrl = params.get('ws') ?? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}`;
const token = params.get('token') ?? undefined;

const $ = (id) => document.getElementById(id);
const el = (tag, text, className) => {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
};

const WORDS = {
  name_taken: 'That name is taken; choose another.',
  name_required: 'Set a name first.',
  invalid_name: 'That name cannot be used.',
  not_a_member: 'You are not in that room.',
  rate_limited: 'Slow down a little: too many requests.',
  timeout: 'The chat did not answer in time; try again.',
  connection_lost: 'The connection dropped before the chat answered; it may not have been sent.',
  closed: 'The connection is closed.',
  throttled: 'The chat is busy (too many requests); try again.',
};
/** An error in words: the server's message (already words), else ours for the code. */
const describe = (error) => error?.message || WORDS[error?.code] || `Something went wrong (${error?.code ?? 'unknown'}).`;
const showError = (error) => {
  $('error').textContent = describe(error);
};
const clearError = () => {
  $('error').textContent = '';
};

const chat = new ChatClient(wsUrl, { token });
// Exposed for the browser tests and for poking at from the console.
window.chat = chat;

/** room -> Map(key -> entry), a room's conversation by (id, frame key); shown sorted by id. */
const logs = new Map();
let current = 'lobby';
const saved = JSON.parse(sessionStorage.getItem('chat') ?? '{}');

function logOf(room) {
  if (!logs.has(room)) logs.set(room, new Map());
  return logs.get(room);
}

/** Adds an event or a history frame to its room's log (once per id and kind). */
function add(room, entry) {
  const log = logOf(room);
  const key = `${entry.id}:${entry.kind}`;
  if (log.has(key)) return;
  log.set(key, entry);
  if (room === current) renderLog();
}

function fromFrame(frame) {
  if (typeof frame.publicMessage === 'string') return { room: frame.room ?? 'lobby', entry: { id: frame.id, ts: frame.ts, kind: 'public', text: frame.publicMessage } };
  if (typeof frame.privateMessage === 'string') {
    const text = frame.to ? `${frame.privateMessage} (to ${frame.to})` : frame.privateMessage;
    return { room: 'lobby', entry: { id: frame.id, ts: frame.ts, kind: 'private', text } };
  }
  return { room: frame.room ?? 'lobby', entry: { id: frame.id, ts: frame.ts, kind: 'system', text: frame.systemMessage } };
}

function renderLog() {
  const list = $('log');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const entries = [...logOf(current).values()].sort((a, b) => a.id - b.id || a.kind.localeCompare(b.kind));
  list.replaceChildren(
    ...entries.map((entry) => {
      const item = el('li', undefined, entry.kind);
      item.dataset.id = entry.id;
      const time = entry.ts ? new Date(entry.ts).toLocaleTimeString() : '';
      item.append(el('span', time, 'meta'), el('span', entry.kind === 'private' ? `(private) ${entry.text}` : entry.text, 'text'));
      return item;
    }),
  );
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function renderRooms() {
  const rooms = ['lobby', ...chat.rooms];
  $('rooms').replaceChildren(
    ...rooms.map((room) => {
      const item = el('li');
      item.dataset.room = room;
      item.setAttribute('aria-current', String(room === current));
      item.append(el('span', room));
      item.addEventListener('click', () => switchTo(room));
      if (room !== 'lobby') {
        const leave = el('button', 'leave');
        leave.type = 'button';
        leave.addEventListener('click', (event) => {
          event.stopPropagation();
          chat.leave(room).then(() => {
            save();
            if (current === room) switchTo('lobby');
            else renderRooms();
          }, showError);
        });
        item.append(leave);
      }
      return item;
    }),
  );
}

function renderMembers() {
  const members = chat.members.get(current) ?? [];
  $('members').replaceChildren(...members.map((name) => el('li', name)));
  const to = $('to');
  const chosen = to.value;
  const everyone = el('option', current === 'lobby' ? 'everyone here' : `everyone in ${current}`);
  everyone.value = '';
  const others = (chat.members.get('lobby') ?? []).filter((name) => name !== chat.name);
  to.replaceChildren(
    everyone,
    ...others.map((name) => {
      const option = el('option', `only ${name}`);
      option.value = name;
      return option;
    }),
  );
  to.value = others.includes(chosen) ? chosen : '';
}

function switchTo(room) {
  current = room;
  $('room-name').textContent = room;
  $('earlier').disabled = false;
  renderRooms();
  renderMembers();
  renderLog();
}

/** Scroll-back: the page of history before the oldest id shown (`newest`: the latest page). */
async function loadEarlier(room = current, newest = false) {
  const ids = [...logOf(room).values()].map((e) => e.id).filter(Number.isInteger);
  const before = ids.length && !newest ? Math.min(...ids) : undefined;
  try {
    const page = await chat.history({ room, before, limit: 50 });
    for (const frame of page.frames) {
      const { room: r, entry } = fromFrame(frame);
      if (r === room) add(room, entry);
    }
    if (page.frames.length === 0 && room === current) $('earlier').disabled = true;
  } catch (error) {
    showError(error);
  }
}

function save() {
  sessionStorage.setItem('chat', JSON.stringify({ name: chat.name, rooms: [...chat.rooms] }));
}

function renderMe() {
  $('me').textContent = chat.name ? `you are ${chat.name}` : 'no name yet';
}

chat.on('state', ({ state, delayMs, reason }) => {
  const badge = $('state');
  badge.dataset.state = state;
  badge.textContent =
    state === 'reconnecting' && delayMs !== undefined
      ? `reconnecting (next try in ${(delayMs / 1000).toFixed(1)} s)`
      : state === 'closed' && reason
        ? `closed: ${reason}`
        : state;
  if (state === 'open') renderMe();
});
chat.on('event', (event) => add(event.type === 'private' ? 'lobby' : event.room, { id: event.id, ts: event.ts, kind: event.type, text: event.type === 'private' && event.to ? `${event.text} (to ${event.to})` : event.text }));
chat.on('members', ({ room }) => {
  if (room === current || room === 'lobby') renderMembers();
});
chat.on('error', showError);

$('name-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  try {
    await chat.setName($('name').value);
    clearError();
    save();
    renderMe();
    renderMembers();
  } catch (error) {
    showError(error);
  }
});

$('join-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const room = $('join-room').value;
  try {
    await chat.join(room);
    clearError();
    $('join-room').value = '';
    save();
    switchTo(room);
    loadEarlier(room, true);
  } catch (error) {
    showError(error);
  }
});

$('send-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('message');
  const message = input.value;
  const to = $('to').value;
  try {
    if (to) await chat.sendPrivate(to, message);
    else await chat.sendPublic(message, current);
    clearError();
    if (input.value === message) input.value = '';
  } catch (error) {
    showError(error);
  }
});

$('earlier').addEventListener('click', () => loadEarlier());

// A reload: take the name and rooms back (the old page's connection may hold the name for a
// moment, until its $disconnect has run), then show each room's recent history.
async function resume() {
  await chat.connect().catch(() => {});
  if (saved.name) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        await chat.setName(saved.name);
        break;
      } catch (error) {
        if (error.code !== 'name_taken' || attempt >= 20) {
          showError(error);
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 300));
      }
    }
    for (const room of saved.rooms ?? []) await chat.join(room).catch(showError);
    save();
  }
  renderMe();
  switchTo(current);
  // The conversation so far, from history (after a reload too).
  for (const room of ['lobby', ...chat.rooms]) await loadEarlier(room, true);
}
resume();
