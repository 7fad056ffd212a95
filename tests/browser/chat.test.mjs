// End-to-end tests of the duplex-chat page in headless Chromium, driven by
// playwright-core: `node --test` in this folder (see README.md here).
//
// Each test user is a page in its own browser context. The server is the
// release binary, started by the tests on a free loopback port.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  assertReceivedExactly,
  checkPrerequisites,
  freePort,
  launchBrowser,
  messageTexts,
  newPage,
  say,
  screenshot,
  sel,
  signIn,
  startServer,
  waitForMessage,
  waitOnline,
} from './harness.mjs';

// Chromium and the server binary must be there: a missing one fails the
// whole run, loudly, with the reason (never a skip).
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

function assertNoProblems(...pages) {
  for (const page of pages) assert.deepEqual(page.problems, [], 'errors in the page');
}

describe('the chat page', () => {
  let server;
  let ada;
  let bob;
  let cyd;

  before(async () => {
    server = await startServer(await freePort(), { log: 'server-chat' });
  });

  after(async () => {
    for (const page of [ada, bob, cyd]) await page?.context().close();
    await server?.stop();
  });

  test('two pages chat in a room, and a page in another room sees none of it', async () => {
    ada = await newPage(browser);
    bob = await newPage(browser);
    cyd = await newPage(browser);
    await signIn(ada, server.url, 'Ada');
    await signIn(bob, server.url, 'Bob');

    // Cyd moves to #random: joins it, then leaves #general.
    await signIn(cyd, server.url, 'Cyd');
    await cyd.locator('#room-input').fill('Random');
    await cyd.locator('#room-input').press('Enter');
    await cyd.locator(sel.title, { hasText: '# random' }).waitFor();
    await cyd.locator(`${sel.roomList} [data-testid="room-general"]`).click();
    await cyd.locator(sel.title, { hasText: '# general' }).waitFor();
    await cyd.locator('#leave-button').click();
    await cyd.locator(`${sel.roomList} [data-testid="room-general"]`).waitFor({ state: 'detached' });
    await cyd.locator(sel.title, { hasText: '# random' }).waitFor();
    await ada.locator(sel.memberList, { hasText: 'Cyd' }).waitFor({ state: 'detached' });

    await say(ada, 'Hello from Ada 👋');
    await waitForMessage(bob, 'Hello from Ada 👋');
    await waitForMessage(ada, 'Hello from Ada 👋');
    await say(bob, 'Hi Ada!\nTwo lines from Bob.');
    await waitForMessage(ada, 'Two lines from Bob.');
    await say(ada, 'See https://example.com/docs for the details.');
    await waitForMessage(bob, 'for the details');

    const said = [
      'Hello from Ada 👋',
      'Hi Ada!\nTwo lines from Bob.',
      'See https://example.com/docs for the details.',
    ];
    assert.deepEqual(await messageTexts(bob), await messageTexts(ada));
    assert.deepEqual(await messageTexts(ada), said);
    // The page drops repeated ids, so what it shows cannot tell a message
    // delivered twice (to its sender, say) from one delivered once: the
    // frames can. Each arrived once on each socket, the sender's included.
    await assertReceivedExactly(ada, 'message', said);
    await assertReceivedExactly(bob, 'message', said);
    // The link is a link, and the text was not taken as HTML.
    const link = ada.locator(`${sel.messages} .msg .text a`);
    assert.equal(await link.getAttribute('href'), 'https://example.com/docs');
    assert.equal(await link.getAttribute('rel'), 'noopener noreferrer');

    // Cyd, in #random, saw nothing of it: not in the page, no unread badge.
    await cyd.waitForTimeout(300);
    const cydText = await cyd.locator('body').innerText();
    for (const text of ['Hello from Ada', 'Two lines from Bob', 'for the details']) {
      assert.ok(!cydText.includes(text), `Cyd's page shows "${text}"`);
    }
    assert.equal(await cyd.locator(`${sel.roomList} .badge`).count(), 0);
    // The room directory still tells Cyd #general exists, with 2 people.
    await cyd.locator('[data-testid="other-room-general"]', { hasText: '2' }).waitFor();

    // And Cyd's own room works.
    await say(cyd, 'Anyone in random?');
    await waitForMessage(cyd, 'Anyone in random?');
    assert.ok(!(await ada.locator('body').innerText()).includes('Anyone in random?'));
    await assertReceivedExactly(cyd, 'message', ['Anyone in random?']);
    await assertReceivedExactly(ada, 'message', said);

    await screenshot(ada, 'chat-ada');
    await screenshot(bob, 'chat-bob');
    await screenshot(cyd, 'chat-cyd-random');
    assertNoProblems(ada, bob, cyd);
  });

  test('presence: members and join/leave notices follow people', async () => {
    // Everyone online is listed; the room shows its members.
    for (const name of ['Ada', 'Bob', 'Cyd']) {
      await ada.locator(`${sel.userList} [data-testid="person-${name}"]`).waitFor();
    }
    assert.deepEqual(
      await ada.locator(`${sel.memberList} .label`).allInnerTexts(),
      ['Ada', 'Bob'],
    );
    await ada.locator('#chat-subtitle', { hasText: '2 members' }).waitFor();

    // Dee arrives in #general: Ada sees the notice and the member.
    const dee = await newPage(browser);
    await signIn(dee, server.url, 'Dee');
    await ada.locator(`${sel.messages} .notice`, { hasText: 'Dee joined' }).waitFor();
    await ada.locator(`${sel.memberList} [data-testid="person-Dee"]`).waitFor();
    await ada.locator('#chat-subtitle', { hasText: '3 members' }).waitFor();
    // Dee got the room's history on joining.
    await waitForMessage(dee, 'Hello from Ada 👋');
    assert.equal((await messageTexts(dee)).length, 3);

    // Dee closes the tab: a leave notice, and gone from every list.
    await dee.context().close();
    await ada.locator(`${sel.messages} .notice`, { hasText: 'Dee left' }).waitFor();
    await ada.locator(`${sel.memberList} [data-testid="person-Dee"]`).waitFor({ state: 'detached' });
    await ada.locator(`${sel.userList} [data-testid="person-Dee"]`).waitFor({ state: 'detached' });
    await bob.locator(`${sel.messages} .notice`, { hasText: 'Dee left' }).waitFor();
    assertNoProblems(ada, bob, cyd);
  });

  test('a direct message arrives only where it was sent', async () => {
    await ada.locator(`${sel.userList} [data-testid="person-Bob"]`).click();
    await ada.locator(sel.title, { hasText: 'Bob' }).waitFor();
    await say(ada, 'psst, Bob: just between us');
    await waitForMessage(ada, 'just between us');

    // Bob gets a DM thread with an unread badge and a toast...
    const thread = bob.locator(`${sel.dmList} [data-testid="person-Ada"]`);
    await thread.locator('.badge', { hasText: '1' }).waitFor();
    await bob.locator('[data-testid="toasts"]', { hasText: 'Ada sent you a direct message' }).waitFor();
    // ...not in the room.
    assert.ok(!(await messageTexts(bob)).some((t) => t.includes('just between us')));
    await thread.click();
    await waitForMessage(bob, 'just between us');
    await say(bob, 'Got it 👍');
    await waitForMessage(ada, 'Got it 👍');

    // Each end got each direct message once (its own back included).
    const dms = ['psst, Bob: just between us', 'Got it 👍'];
    await assertReceivedExactly(ada, 'dm', dms);
    await assertReceivedExactly(bob, 'dm', dms);

    // Cyd sees nothing of it, not even a frame.
    await cyd.waitForTimeout(300);
    const cydText = await cyd.locator('body').innerText();
    assert.ok(!cydText.includes('just between us') && !cydText.includes('Got it'));
    assert.equal(await cyd.locator(`${sel.dmList} li`).count(), 0);
    await assertReceivedExactly(cyd, 'dm', []);

    await screenshot(bob, 'dm-bob');
    assertNoProblems(ada, bob, cyd);
  });

  test('a name in use is refused on the sign-in form', async () => {
    const eve = await newPage(browser);
    await eve.goto(`${server.url}/`);
    await eve.locator('#name-input').fill('ada');
    await eve.locator('#login-button').click();
    await eve.locator(sel.loginError, { hasText: 'already in use' }).waitFor();
    assert.ok(await eve.locator('#login').isVisible());
    // A bad name is caught before it is sent.
    await eve.locator('#name-input').fill('<script>');
    await eve.locator('#login-button').click();
    await eve.locator(sel.loginError, { hasText: 'letters, digits' }).waitFor();
    await screenshot(eve, 'login-name-taken');
    await eve.locator('#name-input').fill('Eve');
    await eve.locator('#login-button').click();
    await waitOnline(eve);
    await eve.locator(sel.title, { hasText: '# general' }).waitFor();
    assertNoProblems(eve);
    await eve.context().close();
  });

  test('a reload keeps the name and the rooms', async () => {
    await cyd.reload();
    await waitOnline(cyd);
    await cyd.locator('[data-testid="me-name"]', { hasText: 'Cyd' }).waitFor();
    await cyd.locator(`${sel.roomList} [data-testid="room-random"]`).waitFor();
    assert.equal(await cyd.locator(`${sel.roomList} [data-testid="room-general"]`).count(), 0);
    // The server kept #random's history for the reloaded page.
    await cyd.locator(`${sel.roomList} [data-testid="room-random"]`).click();
    await waitForMessage(cyd, 'Anyone in random?');
    await say(cyd, 'Back after a reload');
    await waitForMessage(cyd, 'Back after a reload');
    assertNoProblems(cyd);
  });

  test('a phone-sized screen gets the sidebar as a drawer', async () => {
    const phone = await newPage(browser, { width: 390, height: 760 });
    await signIn(phone, server.url, 'Fay');
    await waitForMessage(phone, 'Hello from Ada 👋');
    const sidebarRight = () => phone.evaluate(() => document.getElementById('sidebar').getBoundingClientRect().right);
    assert.ok((await sidebarRight()) <= 0, 'the sidebar is off screen');
    await screenshot(phone, 'phone-chat');
    await phone.locator('#menu-button').click();
    await phone.locator(`${sel.roomList} [data-testid="room-general"]`).waitFor();
    await phone.waitForTimeout(300); // the slide-in transition
    assert.ok((await sidebarRight()) > 200, 'the sidebar slid in');
    await screenshot(phone, 'phone-sidebar');
    assertNoProblems(phone);
    await phone.context().close();
  });
});

test('the page reconnects by itself after the server restarts, and can send again', async () => {
  const port = await freePort();
  let server = await startServer(port, { log: 'server-restart' });
  const page = await newPage(browser);
  try {
    await signIn(page, server.url, 'Gus');
    await say(page, 'before the restart');
    await waitForMessage(page, 'before the restart');

    // SIGTERM: a graceful shutdown, the page gets Close 1001. SIGKILL: the
    // connection just drops.
    const rounds = [[1, 'SIGTERM', 'The server is restarting'], [2, 'SIGKILL', 'Connection lost']];
    for (const [round, signal, why] of rounds) {
      await server.stop(signal);
      // The page notices and says so.
      await page.locator(`${sel.connState}[data-state="reconnecting"]`).waitFor({ state: 'attached' });
      await page.locator(sel.banner, { hasText: why }).waitFor();
      await page.locator(sel.banner, { hasText: 'Reconnecting' }).waitFor();
      assert.equal(await page.locator('#send-button').isDisabled(), true);
      await screenshot(page, `restart-${round}-reconnecting`);

      server = await startServer(port, { log: 'server-restart' });
      await waitOnline(page, 20_000);
      await page.locator(sel.banner).waitFor({ state: 'hidden' });
      // In memory, a restart loses the history: the page says so, once a
      // round, instead of leaving a silent gap.
      await page.locator(`${sel.messages} .notice.warn`, { hasText: 'Some messages of #general could not be recovered' })
        .nth(round - 1).waitFor();
      await page.locator(sel.memberList, { hasText: 'Gus' }).waitFor();

      await say(page, `after restart ${round}`);
      await waitForMessage(page, `after restart ${round}`);
      await screenshot(page, `restart-${round}-reconnected`);
    }
    // What was shown before the restarts is still there, and each message
    // came back once over the three connections.
    assert.equal(await page.locator(`${sel.messages} .notice.warn`).count(), 2);
    const said = ['before the restart', 'after restart 1', 'after restart 2'];
    assert.deepEqual(await messageTexts(page), said);
    await assertReceivedExactly(page, 'message', said);
    assertNoProblems(page);
  } finally {
    await page.context().close();
    await server.stop();
  }
});

// Messages the server inflated ("received") or compressed ("sent"), from
// its /metrics.
async function encodedMessages(server) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const count = (direction) => {
    const m = text.match(new RegExp(`duplex_extension_encoded_messages_total\\{direction="${direction}"\\} (\\d+)`));
    return m ? Number(m[1]) : 0;
  };
  return { received: count('received'), sent: count('sent') };
}

test('Chromium negotiates permessage-deflate (no context takeover) with /echo and /chat and exchanges compressed messages', async () => {
  const server = await startServer(await freePort(), { log: 'server-deflate' });
  const page = await newPage(browser);
  try {
    await page.goto(`${server.url}/`);
    const name = 'Deflate '.repeat(40).trim();
    const result = await page.evaluate((name) => new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://${location.host}/echo`);
      const got = [];
      const timer = setTimeout(() => reject(new Error(`timed out; got ${JSON.stringify(got)}`)), 5000);
      ws.onmessage = (e) => {
        got.push(e.data);
        if (got.length === 1) ws.send(name);
        if (got.length === 2) ws.send('bye');
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        resolve({ extensions: ws.extensions, got, code: e.code, reason: e.reason });
      };
      ws.onerror = () => {};
    }), name);
    // RFC 7692 §7.1.1: the shipped policy keeps no context either way,
    // and Chromium accepts being asked for client_no_context_takeover.
    assert.equal(result.extensions, 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
    assert.deepEqual(result.got, ['Please enter your name', `Hi, ${name}!`]);
    assert.equal(result.code, 1000);
    assert.equal(result.reason, 'Client said BYE');
    const afterEcho = await encodedMessages(server);
    // Chromium compressed the name (and "bye"); our longer greeting went out compressed.
    assert.ok(afterEcho.received >= 2, `inflated from Chromium: ${JSON.stringify(afterEcho)}`);
    assert.ok(afterEcho.sent >= 1, `compressed to Chromium: ${JSON.stringify(afterEcho)}`);

    // The page's own /chat socket: what Chromium sends arrives compressed
    // and is understood, and the room's messages (compressed once by the
    // hub) are shown.
    await signIn(page, server.url, 'Deflater');
    const line = 'compressible '.repeat(20).trim();
    await say(page, line);
    await waitForMessage(page, line);
    const afterChat = await encodedMessages(server);
    assert.ok(afterChat.received > afterEcho.received, `inflated from the chat page: ${JSON.stringify(afterChat)}`);
    assertNoProblems(page);
  } finally {
    await page.context().close();
    await server.stop();
  }
});
