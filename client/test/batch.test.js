// Batched frames (`?batch=1`) against the REAL local stack, in the ideal and the AWS-like
// mode, with the event source mapping gathering records for 800 ms (`--batching-window`):
// the library opts in and unpacks `{"batch":[…]}` frames through its dedupe and ordering
// path; a tutorial-style client (a plain socket, no opt-in) in the same room gets one frame
// per message as before. Both see every message once, in order.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { ChatClient } from '../src/index.js';
import { rawClient, recordingWebSocket, startStack, waitUntil } from './stack.js';

const MODES = [
  { name: 'ideal', args: [] },
  { name: 'aws-like', args: ['--aws-like'] },
];
const MESSAGES = 30;

for (const mode of MODES) {
  describe(`batched frames, ${mode.name} mode`, () => {
    let stack;
    before(async () => {
      stack = await startStack([
        ...mode.args,
        '--batching-window', '0.8',
        // One sender writes 30 messages at once; the limits are not what this tests.
        '--rate-limit-per-second', '0',
        '--principal-rate-per-second', '0',
      ]);
    });
    after(async () => {
      await stack?.stop();
    });

    test('a batched library client and a tutorial client in one room each get every message once, in order', async () => {
      // GIVEN alice, a ChatClient (opted in by default), and bob and carol, plain sockets
      const { WebSocket, sockets } = recordingWebSocket();
      const alice = new ChatClient(stack.ws, { WebSocket });
      const events = [];
      alice.on('event', (event) => events.push(event));
      const bob = await rawClient(stack.ws);
      const carol = await rawClient(stack.ws);
      try {
        await alice.connect();
        assert.match(sockets[0].url, /[?&]batch=1\b/, 'the library asks for batches');
        await alice.setName('alice');
        // (Joins inside one batching window are coalesced: wait for the member lists.)
        bob.send({ action: 'setName', name: 'bob' });
        await bob.waitFor((f) => f.members?.includes('bob'), 'bob joined');
        carol.send({ action: 'setName', name: 'carol' });
        await carol.waitFor((f) => f.members?.includes('carol'), 'carol joined');
        await waitUntil(() => alice.members.get('lobby')?.includes('carol'), 'alice saw carol join');

        // WHEN carol sends 30 messages in one go
        for (let n = 0; n < MESSAGES; n++) carol.send({ action: 'sendPublic', message: `m${n}` });

        // THEN alice's application gets each once, in order
        const expected = Array.from({ length: MESSAGES }, (_, n) => `carol: m${n}`);
        const publicTexts = () => events.filter((e) => e.type === 'public').map((e) => e.text);
        await waitUntil(() => publicTexts().length >= MESSAGES, 'alice got every message', 15_000);
        assert.deepEqual(publicTexts(), expected);
        // AND they came packed: at least one batch frame, and far fewer frames than messages
        const carrying = sockets[0].raw.filter(
          (f) => f.publicMessage !== undefined || (Array.isArray(f.batch) && f.batch.some((i) => i.publicMessage !== undefined)),
        );
        assert.ok(carrying.some((f) => Array.isArray(f.batch)), 'alice received batch frames');
        assert.ok(carrying.length * 3 <= MESSAGES, `alice: ${carrying.length} frames for ${MESSAGES} messages`);
        // AND bob, who did not opt in, got one plain frame per message, the same frames
        await bob.waitFor((f) => f.publicMessage === `carol: m${MESSAGES - 1}`, 'bob got the last message', 15_000);
        assert.ok(bob.frames.every((f) => f.batch === undefined), 'bob never gets a batch');
        const bobs = bob.frames.filter((f) => f.publicMessage !== undefined);
        assert.deepEqual(bobs.map((f) => f.publicMessage), expected);
        const inner = carrying.flatMap((f) => (Array.isArray(f.batch) ? f.batch : [f])).filter((f) => f.publicMessage !== undefined);
        assert.deepEqual(inner, bobs, 'the inner frames are the frames bob got, ids included');
      } finally {
        alice.close();
        bob.close();
        carol.close();
      }
    });
  });
}
