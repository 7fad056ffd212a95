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

test('two nodes on Redis: pages on different nodes chat, every node restarts, and the pages recover all of it once', async () => {
  const redis = await startRedis(await freePort(), { log: 'redis-nodes' });
  // A prefix of this run's own, so nothing left in a shared Redis can count.
  const prefix = `duplex-browser-${process.pid}-${Date.now()}`;
  const args = ['--redis-url', redis.url, '--redis-prefix', prefix];
  const portA = await freePort();
  const portB = await freePort();
  let nodeA = await startServer(portA, { log: 'node-a', args });
  let nodeB = await startServer(portB, { log: 'node-b', args });
  const ada = await newPage(browser);
  const bob = await newPage(browser);
  let cyd;
  try {
    await signIn(ada, nodeA.url, 'Ada');
    await signIn(bob, nodeB.url, 'Bob');
    // Presence across nodes: each sees the other in the room.
    await ada.locator(`${sel.memberList} [data-testid="person-Bob"]`).waitFor();
    await bob.locator(`${sel.memberList} [data-testid="person-Ada"]`).waitFor();

    await say(ada, 'a1 from node A');
    await waitForMessage(bob, 'a1 from node A');
    await say(bob, 'b1 from node B');
    await waitForMessage(ada, 'b1 from node B');
    await say(ada, 'a2 from node A');
    await waitForMessage(bob, 'a2 from node A');
    const before = ['a1 from node A', 'b1 from node B', 'a2 from node A'];
    await assertShows(ada, before, 'Ada before the restart');
    await assertShows(bob, before, 'Bob before the restart');

    // Direct messages across the nodes.
    await ada.locator(`${sel.userList} [data-testid="person-Bob"]`).click();
    await ada.locator(sel.title, { hasText: 'Bob' }).waitFor();
    await say(ada, 'dm Ada to Bob');
    await bob.locator(`${sel.dmList} [data-testid="person-Ada"]`).waitFor();
    await openDmWith(bob, 'Ada');
    await waitForMessage(bob, 'dm Ada to Bob');
    await say(bob, 'dm Bob to Ada');
    await waitForMessage(ada, 'dm Bob to Ada');
    const dms = ['dm Ada to Bob', 'dm Bob to Ada'];
    await assertShows(ada, dms, 'Ada\'s direct messages');
    await assertShows(bob, dms, 'Bob\'s direct messages');
    await openRoom(ada, 'general');
    await openRoom(bob, 'general');

    // Every node goes: A gracefully (Close 1001), B killed (the connection
    // just drops). Redis keeps the streams.
    await nodeA.stop('SIGTERM');
    await nodeB.stop('SIGKILL');
    await ada.locator(`${sel.connState}[data-state="reconnecting"]`).waitFor({ state: 'attached' });
    await bob.locator(`${sel.connState}[data-state="reconnecting"]`).waitFor({ state: 'attached' });
    await screenshot(bob, 'nodes-all-down');

    // A comes back first; Ada says something while B is still down.
    nodeA = await startServer(portA, { log: 'node-a', args });
    await waitOnline(ada, 20_000);
    await assertShows(ada, before, 'Ada after node A restarted');
    await say(ada, 'a3 while node B is down');
    await waitForMessage(ada, 'a3 while node B is down');

    nodeB = await startServer(portB, { log: 'node-b', args });
    await waitOnline(bob, 20_000);
    await say(bob, 'b2 after the restarts');
    const all = [...before, 'a3 while node B is down', 'b2 after the restarts'];
    await assertShows(bob, all, 'Bob after both restarts');
    await assertShows(ada, all, 'Ada after both restarts');
    // Redis kept everything, so both recovered from their last ids exactly.
    for (const [page, missed] of [[ada, []], [bob, ['a3 while node B is down']]]) {
      const answers = recoveries(page, 'general');
      assert.ok(answers.length >= 1, 'a rejoin with since after the restart');
      for (const answer of answers) assert.equal(answer.recovered, true, JSON.stringify(answer));
      assert.deepEqual(answers.flatMap((a) => a.history.map((m) => m.text)), missed);
      assert.equal(await warnings(page).count(), 0, 'no "could not be recovered" notice');
    }
    await openDmWith(ada, 'Bob');
    await assertShows(ada, dms, 'Ada\'s direct messages after the restarts');
    await openDmWith(bob, 'Ada');
    await assertShows(bob, dms, 'Bob\'s direct messages after the restarts');
    await screenshot(bob, 'nodes-recovered');

    // The history lives in Redis, not in the pages: Bob's page reloaded
    // (nothing kept but his name, rooms and conversations) shows it all
    // again from node B, and a newcomer on node A gets the room's.
    await bob.reload();
    await waitOnline(bob);
    await openRoom(bob, 'general');
    await assertShows(bob, all, 'Bob after a reload');
    await openDmWith(bob, 'Ada');
    await assertShows(bob, dms, 'Bob\'s direct messages after a reload');
    cyd = await newPage(browser);
    await signIn(cyd, nodeA.url, 'Cyd');
    await assertShows(cyd, all, 'Cyd, new on node A');
    await screenshot(cyd, 'nodes-newcomer');
    for (const page of [ada, bob, cyd]) assert.deepEqual(page.problems, []);
  } finally {
    for (const page of [ada, bob, cyd]) await page?.context().close();
    await nodeA.stop();
    await nodeB.stop();
    await redis.stop();
  }
});
