// Test harness: the REAL local stack (`target/debug/chat-local`, started on port 0), real
// WebSockets (the `ws` package: Node 20 has no stable global WebSocket), JWTs for the
// `--auth-jwt-secret` mode, and small helpers. No mocks.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import WebSocket from 'ws';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The chat-local binary `cargo test`/`cargo build` left behind (CHAT_LOCAL_BIN overrides). */
export function chatLocalBinary() {
  const target = process.env.CARGO_TARGET_DIR ?? path.join(repo, 'target');
  const bin = process.env.CHAT_LOCAL_BIN ?? path.join(target, 'debug', 'chat-local');
  if (!existsSync(bin)) {
    throw new Error(`${bin} does not exist: build it first (cargo build -p chat-local), or set CHAT_LOCAL_BIN`);
  }
  return bin;
}

/** Starts chat-local on a free port with `args`; resolves with its two URLs and a stop(). */
export async function startStack(args = [], { log = 'warn' } = {}) {
  const child = spawn(chatLocalBinary(), ['--port', '0', ...args], {
    env: { ...process.env, RUST_LOG: log },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const lines = createInterface({ input: child.stdout });
  const urls = await new Promise((resolve, reject) => {
    const found = {};
    const timer = setTimeout(() => reject(new Error(`chat-local printed no URLs in 20 s; stderr:\n${stderr}`)), 20_000);
    child.once('exit', (code) => reject(new Error(`chat-local exited (${code}) before printing its URLs; stderr:\n${stderr}`)));
    lines.on('line', (line) => {
      // stdout carries only these two lines (README, "Run it locally").
      const ws = /^WebSocket URL: (.*)$/.exec(line);
      const conn = /^Connection URL: (.*)$/.exec(line);
      if (ws) found.ws = ws[1];
      if (conn) found.connections = conn[1];
      if (found.ws && found.connections) {
        clearTimeout(timer);
        resolve(found);
      }
    });
  });
  return {
    ...urls,
    http: urls.ws.replace(/^ws:/, 'http:').replace(/\/[^/]*$/, ''),
    stderr: () => stderr,
    /** The connection ids the gateway logged as connected, oldest first (needs log 'info'). */
    connectionIds: () =>
      [...stderr.replace(/\x1b\[[0-9;]*m/g, '').matchAll(/ connected connection_id="?([^"\s]+)/g)].map((m) => m[1]),
    /** `DELETE @connections/{id}`: the server drops the connection, as the Management API does. */
    async disconnect(connectionId) {
      const response = await fetch(`${urls.connections}/${encodeURIComponent(connectionId)}`, { method: 'DELETE' });
      if (response.status !== 204) throw new Error(`DELETE @connections/${connectionId}: ${response.status}`);
    },
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** An HS256 JWT for `--auth-jwt-secret secret`, subject `sub`, valid for an hour. */
export function token(secret, sub) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A WebSocket constructor for ChatClient that records every socket it makes, so a test can
 * drop one's TCP connection (`terminate()`: no close frame, as when a network goes). */
export function recordingWebSocket() {
  const sockets = [];
  class Recorded extends WebSocket {
    constructor(url) {
      super(url);
      sockets.push(this);
      this.sent = [];
      this.received = [];
      this.held = [];
      this.hold = Recorded.prototype.holdPredicate ?? null; // a predicate: outgoing frames it matches wait for release()
      this.raw = []; // frames as they came; `received` has a batch's frames one by one
      this.addEventListener('message', (event) => {
        const frame = JSON.parse(String(event.data));
        this.raw.push(frame);
        this.received.push(...(Array.isArray(frame?.batch) ? frame.batch : [frame]));
      });
      const send = this.send.bind(this);
      this.send = (data, ...rest) => {
        if (this.hold?.(JSON.parse(String(data)))) {
          this.held.push(() => this.send(data, ...rest));
          return undefined;
        }
        this.sent.push(String(data));
        return send(data, ...rest);
      };
      /** Sends the held frames (a network that delayed them). */
      this.release = () => {
        this.hold = null;
        for (const sendHeld of this.held.splice(0)) sendHeld();
      };
    }
  }
  /** Holds, on every socket made from now on, the outgoing frames `predicate` matches. */
  const holdOnNext = (predicate) => {
    Recorded.prototype.holdPredicate = predicate;
  };
  return { WebSocket: Recorded, sockets, holdOnNext };
}

/** A raw client: a plain `ws` socket speaking the wire protocol, for the "others". */
export async function rawClient(url) {
  const ws = new WebSocket(url);
  const frames = [];
  const waiters = new Set();
  ws.on('message', (data) => {
    const frame = JSON.parse(String(data));
    frames.push(frame);
    for (const waiter of [...waiters]) waiter();
  });
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return {
    ws,
    frames,
    send(frame) {
      ws.send(JSON.stringify(frame));
    },
    /** Resolves with the first frame (from now on, or already received) that matches. */
    waitFor(predicate, what = 'a frame', timeoutMs = 10_000) {
      return waitUntil(() => frames.find(predicate), what, timeoutMs, (wake) => {
        waiters.add(wake);
        return () => waiters.delete(wake);
      });
    },
    close() {
      ws.close();
    },
  };
}

/** Polls `check` (and re-checks on `subscribe`'s wake-ups) until it returns a truthy value. */
export function waitUntil(check, what, timeoutMs = 10_000, subscribe = null) {
  return new Promise((resolve, reject) => {
    let unsubscribe = () => {};
    const done = (value) => {
      clearInterval(poll);
      clearTimeout(timer);
      unsubscribe();
      resolve(value);
    };
    const test = () => {
      const value = check();
      if (value) done(value);
    };
    const poll = setInterval(test, 20);
    const timer = setTimeout(() => {
      clearInterval(poll);
      unsubscribe();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
    if (subscribe) unsubscribe = subscribe(test);
    test();
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
