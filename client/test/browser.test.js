// The chat page in a real browser: Debian's Chromium (/usr/bin/chromium) driven by
// Playwright (playwright-core: it never downloads a browser), against the REAL chat-local,
// which serves the page. Fails, never skips, when Chromium is missing.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

import { sleep, startStack, waitUntil } from './stack.js';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const INJECTION_NAME = '<img src=x onerror=window.p=1>';
const INJECTION_MESSAGE = '<img src=x onerror="window.pwned=1"><b>bold?</b>';

describe('the chat page in Chromium', () => {
  let stack;
  let context;
  let profile;
  before(async () => {
    assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium (or set CHROMIUM)`);
    stack = await startStack([], { log: 'info' });
    profile = mkdtempSync(path.join(tmpdir(), 'chat-chromium-'));
    // These flags keep Chromium off the network (this machine has none: it would hang on it).
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        // Two people are two tabs: the one in the background must not be slowed down.
        '--disable-background-timer-throttling',
        '--disable-renderer-backgrounding',
        '--disable-backgrounding-occluded-windows',
      ],
      viewport: { width: 1100, height: 640 },
    });
  });
  after(async () => {
    await context?.close();
    await stack?.stop();
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  /** Opens the page as a new person (a tab has its own sessionStorage) and sets the name. */
  async function person(name) {
    const page = await context.newPage();
    const before = stack.connectionIds().length;
    await page.goto(`${stack.http}/`);
    await page.locator('#state[data-state="open"]').waitFor();
    await waitUntil(() => stack.connectionIds().length > before, 'the page connected');
    const connectionId = stack.connectionIds()[before];
    await page.fill('#name', name);
    await page.click('#name-form button');
    await page.locator('#me', { hasText: `you are ${name}` }).waitFor();
    return { page, connectionId };
  }

  const logTexts = (page) => page.locator('#log li .text').allTextContents();

  async function say(page, message, to = '') {
    // Playwright's clicks wait for animation frames, which a tab in the background lacks.
    await page.bringToFront();
    await page.selectOption('#to', to);
    await page.fill('#message', message);
    await page.click('#send-form button');
    // Polling, not requestAnimationFrame: a tab in the background gets no frames.
    await page.waitForFunction(() => document.getElementById('message').value === '', null, { polling: 50 });
  }

  test('two people chat; one loses the connection and sees every message once after it recovers; a reload restores the conversation', async () => {
    // GIVEN alice and bob, each on the page
    const alice = await person('alice');
    const bob = await person('bob');
    await alice.page.locator('#members li', { hasText: 'bob' }).waitFor();

    // WHEN they talk, publicly and privately
    await say(alice.page, 'hello bob');
    await bob.page.locator('#log li', { hasText: 'alice: hello bob' }).waitFor();
    await say(bob.page, 'psst', 'alice');
    // THEN each sees the other
    await alice.page.locator('#log li.private', { hasText: 'bob: psst' }).waitFor();

    // WHEN the chat drops bob's connection (DELETE @connections) while alice keeps writing
    // (his page waits a second or two before reconnecting, so she writes while he is away)
    await bob.page.evaluate(() => {
      window.chat.options.initialBackoffMs = 2000;
      window.caughtUp = [];
      window.chat.on('event', (e) => e.replayed && window.caughtUp.push(e.text));
    });
    await stack.disconnect(bob.connectionId);
    const sawReconnecting = bob.page.locator('#state[data-state="reconnecting"]').waitFor();
    for (let i = 1; i <= 10; i += 1) await say(alice.page, `while away ${i}`);
    // THEN bob's page shows it is reconnecting, recovers by itself, and has every message once
    await sawReconnecting;
    await bob.page.locator('#state[data-state="open"]').waitFor();
    await bob.page.locator('#log li', { hasText: 'alice: while away 10' }).waitFor();
    await sleep(300);
    const seen = (await logTexts(bob.page)).filter((t) => t.startsWith('alice: while away'));
    assert.deepEqual(
      seen,
      Array.from({ length: 10 }, (_, i) => `alice: while away ${i + 1}`),
    );
    // AND some of them reached him through the catch-up from history
    assert.ok((await bob.page.evaluate(() => window.caughtUp)).some((t) => t.startsWith('alice: while away')));

    // WHEN bob reloads the page
    await bob.page.reload();
    // THEN his name comes back and the conversation is restored from history
    await bob.page.locator('#me', { hasText: 'you are bob' }).waitFor();
    await bob.page.locator('#log li', { hasText: 'alice: while away 10' }).waitFor();
    const restored = await logTexts(bob.page);
    assert.ok(restored.includes('alice: hello bob'), restored.join('\n'));
    assert.equal(restored.filter((t) => t === 'alice: while away 5').length, 1);

    // The README's screenshot, refreshed on demand (a test run leaves the tree as it was):
    // UPDATE_SCREENSHOT=1 npm test --prefix client
    if (process.env.UPDATE_SCREENSHOT) {
      mkdirSync(path.join(repo, 'docs'), { recursive: true });
      await alice.page.screenshot({ path: path.join(repo, 'docs', 'chat-page.png') });
    }
    await alice.page.close();
    await bob.page.close();
  });

  test('names and messages that look like HTML are shown as text', async () => {
    // GIVEN a person whose name is an <img onerror> and who sends markup
    const mallory = await person(INJECTION_NAME);
    const victim = await person('victim');
    await victim.page.locator('#members li', { hasText: INJECTION_NAME }).waitFor();
    await say(mallory.page, INJECTION_MESSAGE);
    // THEN the others see the characters, and no element was made of them
    const line = `${INJECTION_NAME}: ${INJECTION_MESSAGE}`;
    await victim.page.locator('#log li', { hasText: line }).waitFor();
    for (const { page } of [victim, mallory]) {
      assert.equal(await page.locator('#log img, #log b, #members img').count(), 0);
      assert.equal(await page.evaluate(() => window.p ?? window.pwned ?? null), null);
      assert.ok((await page.locator('#members li').allTextContents()).includes(INJECTION_NAME));
    }
    // AND an error frame is shown in words (the name is taken)
    await victim.page.bringToFront();
    await victim.page.fill('#name', INJECTION_NAME.toUpperCase());
    await victim.page.click('#name-form button');
    await victim.page.locator('#error', { hasText: 'taken' }).waitFor();
    await mallory.page.close();
    await victim.page.close();
  });
});
