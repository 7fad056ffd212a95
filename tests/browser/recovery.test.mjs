// Recovery of what a page missed (issue 11), in headless Chromium: a page
// whose connection drops gets what was said meanwhile when it is back, on
// one node in memory and on two nodes sharing a redis-server of the test's
// own, where every node is restarted. Nothing may be lost or shown twice.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import {
  checkPrerequisites,
  eventsReceived,
  freePort,
  launchBrowser,
  newPage,
  say,
  screenshot,
  sel,
  shownMessages,
  signIn,
  startRedis,
  startRelay,
  startServer,
  waitForMessage,
  waitOnline,
} from './harness.mjs';
import { ID_SHAPE, assertShows, openDmWith, openRoom, recoveries, warnings } from './recovery-helpers.mjs';

try {
  checkPrerequisites();
} catch (err) {
  console.error(`\nFAILED: ${err.message}\n`);
  throw err;
}

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

test('one node in memory: a page whose connection dropped gets what was said meanwhile', async () => {
  const server = await startServer(await freePort(), { log: 'server-recovery' });
  // Bob reaches the server only through the relay, so his connection can be
  // cut while the server and Ada go on.
  const relay = await startRelay(server.port);
  const ada = await newPage(browser);
  const bob = await newPage(browser);
  try {
    await signIn(ada, server.url, 'Ada');
    await signIn(bob, relay.url, 'Bob');
    await say(ada, 'one');
    await waitForMessage(bob, 'one');

    relay.cut();
    await bob.locator(`${sel.connState}[data-state="reconnecting"]`).waitFor({ state: 'attached' });
    // The server has seen Bob go: what Ada says now reaches no socket of his.
    await ada.locator(`${sel.messages} .notice`, { hasText: 'Bob left' }).waitFor();
    const meanwhile = ['two', 'three', 'four'];
    for (const text of meanwhile) await say(ada, text);
    await waitForMessage(ada, 'four');
    await screenshot(bob, 'recovery-memory-cut');

    relay.restore();
    await waitOnline(bob, 20_000);
    await assertShows(bob, ['one', ...meanwhile], 'Bob after the drop');
    await assertShows(ada, ['one', ...meanwhile], 'Ada');
    // Recovered from where Bob stopped: exactly the three he missed came in
    // the answer to his rejoin, and the page says nothing was lost.
    const [rejoin, ...more] = recoveries(bob, 'general');
    assert.equal(more.length, 0, 'one rejoin with since');
    assert.equal(rejoin.recovered, true, JSON.stringify(rejoin));
    assert.deepEqual(rejoin.history.map((m) => m.text), meanwhile);
    assert.equal(await warnings(bob).count(), 0);

    // And the conversation goes on both ways.
    await say(bob, 'back');
    await waitForMessage(ada, 'back');
    await assertShows(bob, ['one', ...meanwhile, 'back'], 'Bob after sending');
    await screenshot(bob, 'recovery-memory-back');
    assert.deepEqual(ada.problems, []);
    assert.deepEqual(bob.problems, []);
  } finally {
    await ada.context().close();
    await bob.context().close();
    await relay.close();
    await server.stop();
  }
});

