// The page's side of recovery (issue 11) against a scripted /chat: the
// page is served by the real binary, but its WebSocket is answered by a
// small fake server in this process (playwright's routeWebSocket), so the
// test can drop the connection, replay, repeat a message, change the epoch
// and report the store down or a gap at will, which a real server does
// only under faults. What the real server does is tested in
// recovery.test.mjs and in crates/duplex-chat/tests.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import {
  checkPrerequisites,
  freePort,
  launchBrowser,
  newPage,
  say,
  sel,
  shownMessages,
  signIn,
  startServer,
  waitOnline,
} from './harness.mjs';

try {
  checkPrerequisites();
} catch (err) {
  console.error(`\nFAILED: ${err.message}\n`);
  throw err;
}

let browser;
let server;

before(async () => {
  browser = await launchBrowser();
  server = await startServer(await freePort(), { log: 'server-page' });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

function compareIds(a, b) {
  const [x, y] = a.split('-').map(Number);
  const [u, v] = b.split('-').map(Number);
  return x - u || y - v;
}

/**
 * Just enough of PROTOCOL.md to talk to one page: rooms and one direct
 * conversation as streams with an epoch; `join` and `dm_history` with
 * `since` replay after it or answer recovered:false.
 */
class FakeChat {
  constructor() {
    this.epoch = 'epoch-1';
    this.refuseHellos = 0;
    this.ms = 1_700_000_000_000;
    this.rooms = new Map();
    this.dms = [];
    this.requests = [];
    this.conn = null;
  }

  nextId() {
    this.ms += 1;
    return `${this.ms}-0`;
  }

  room(name) {
    if (!this.rooms.has(name)) this.rooms.set(name, []);
    return this.rooms.get(name);
  }

  /** A message someone else said, kept but not delivered (said while the page was away). */
  said(room, text, from = 'Zed') {
    const line = { id: this.nextId(), room, from, text, ts: Date.now() };
    this.room(room).push(line);
    return line;
  }

  send(event) {
    this.conn.ws.send(JSON.stringify(event));
  }

  /** Drops the page's connection as a network failure would. */
  drop() {
    this.conn.ws.close({ code: 1006 }).catch(() => {});
    this.conn = null;
  }

  replay(list, since, epoch) {
    const recovered = epoch === this.epoch && list.some((line) => line.id === since);
    return {
      recovered,
      history: recovered ? list.filter((line) => compareIds(line.id, since) > 0) : list.slice(-50),
    };
  }

  attach(ws) {
    const conn = { ws, rooms: new Set(), name: null };
    this.conn = conn;
    const out = (event) => ws.send(JSON.stringify(event));
    out({ type: 'directory', rooms: [], users: [], online: 0 });
    ws.onMessage((data) => {
      const req = JSON.parse(data);
      this.requests.push(req);
      switch (req.type) {
        case 'hello':
          if (this.taken?.has(req.name)) {
            out({ type: 'error', code: 'name_taken', message: `${req.name} is already in use; pick another name`, request: 'hello' });
            break;
          }
          if (this.refuseHellos > 0) {
            this.refuseHellos -= 1;
            out({ type: 'error', code: 'unavailable', message: 'The chat\u2019s message store does not answer', request: 'hello' });
            break;
          }
          conn.name = req.name;
          out({
            type: 'welcome', name: req.name, id: 1, token: 'secret', instance: 'fake', rooms: [],
            limits: { name_chars: 32, text_chars: 2000, rate: 50, burst: 100, rooms: 20, history: 50 },
          });
          break;
        case 'join': {
          conn.rooms.add(req.room);
          const list = this.room(req.room);
          const answer = { type: 'joined', room: req.room, members: [conn.name], epoch: this.epoch };
          if (req.since) Object.assign(answer, this.replay(list, req.since, req.epoch));
          else answer.history = list.slice(-50);
          out(answer);
          break;
        }
        case 'message': {
          const line = { id: this.nextId(), room: req.room, from: conn.name, text: req.text, ts: Date.now() };
          this.room(req.room).push(line);
          out({ type: 'message', ...line });
          break;
        }
        case 'dm_history': {
          const answer = { type: 'dm_history', with: req.with, epoch: this.epoch };
          if (req.since) Object.assign(answer, this.replay(this.dms, req.since, req.epoch));
          else answer.history = this.dms.slice(-50);
          out(answer);
          break;
        }
        case 'ping':
          out({ type: 'pong', id: req.id });
          break;
        default:
          break;
      }
    });
    ws.onClose(() => {
      if (this.conn === conn) this.conn = null;
    });
  }

  async connected(page) {
    await waitOnline(page, 20_000);
    assert.ok(this.conn, 'the page is connected');
  }
}

async function shownTexts(page) {
  return (await shownMessages(page)).map((m) => m.text);
}

async function waitShown(page, text) {
  await page.locator(`${sel.messages} .msg .text`, { hasText: text }).waitFor({ timeout: 20_000 });
}

test('the page rejoins from its last id, drops repeats, and says when messages are lost', async () => {
  const fake = new FakeChat();
  const page = await newPage(browser);
  await page.routeWebSocket(/\/chat$/, (ws) => fake.attach(ws));
  try {
    await signIn(page, server.url, 'Ada');
    await say(page, 'one');
    await say(page, 'two');
    await waitShown(page, 'two');

    // Away for a moment while Zed says two things: the page asks from its
    // last id, in the epoch it knows, and shows them after its own.
    fake.drop();
    await page.locator(`${sel.connState}[data-state="reconnecting"]`).waitFor({ state: 'attached' });
    fake.said('general', 'three');
    const four = fake.said('general', 'four');
    await fake.connected(page);
    await waitShown(page, 'four');
    const rejoin = fake.requests.filter((r) => r.type === 'join').at(-1);
    assert.deepEqual(rejoin, { type: 'join', room: 'general', since: fake.room('general')[1].id, epoch: 'epoch-1' });
    assert.deepEqual(await shownTexts(page), ['one', 'two', 'three', 'four']);

    // A message delivered again (by another node after a failover, say)
    // is not shown twice.
    fake.send({ type: 'message', ...four });
    fake.send({ type: 'message', ...fake.room('general')[0] });
    await page.waitForTimeout(300);
    assert.deepEqual(await shownTexts(page), ['one', 'two', 'three', 'four']);
    assert.equal(await page.locator(`${sel.messages} .notice.warn`).count(), 0);

    // The server says messages were lost before the next one (its store
    // trimmed them before it could read them): the page says so, asks
    // nothing, and goes on with what follows.
    const asked = fake.requests.length;
    fake.send({ type: 'gap', room: 'general', epoch: 'epoch-1' });
    await page.locator(`${sel.messages} .notice.warn`, { hasText: 'Some messages of #general could not be recovered' }).waitFor();
    fake.send({ type: 'message', ...fake.said('general', 'five') });
    await waitShown(page, 'five');
    assert.equal(fake.requests.length, asked, 'a gap asks the server nothing');

    // The store lost everything (a new epoch): what can be had is shown,
    // and the page says that something could not be recovered.
    fake.epoch = 'epoch-2';
    fake.rooms.clear();
    fake.said('general', 'six, in a new epoch');
    fake.drop();
    await fake.connected(page);
    await waitShown(page, 'six, in a new epoch');
    await page.locator(`${sel.messages} .notice.warn`, { hasText: 'Some messages of #general could not be recovered' }).nth(1).waitFor();
    assert.deepEqual(await shownTexts(page), ['one', 'two', 'three', 'four', 'five', 'six, in a new epoch']);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
  }
});

test('the page shows a banner and holds sending while the store is down', async () => {
  const fake = new FakeChat();
  const page = await newPage(browser);
  await page.routeWebSocket(/\/chat$/, (ws) => fake.attach(ws));
  try {
    await signIn(page, server.url, 'Ada');
    fake.send({ type: 'status', redis: 'down' });
    await page.locator(sel.banner, { hasText: 'message store is unreachable' }).waitFor();
    assert.equal(await page.locator('#send-button').isDisabled(), true);
    await say(page, 'not now');
    await page.waitForTimeout(200);
    assert.equal(fake.requests.filter((r) => r.type === 'message').length, 0, 'nothing sent while down');
    fake.send({ type: 'status', redis: 'up' });
    await page.locator(sel.banner).waitFor({ state: 'hidden' });
    assert.equal(await page.locator('#send-button').isDisabled(), false);
    await say(page, 'now');
    await waitShown(page, 'now');

    // A reconnect while the store is down: the `hello` is refused for now
    // (`unavailable`), and the page asks again with its name and token
    // instead of sending its user back to the sign-in form.
    fake.refuseHellos = 1;
    const asked = fake.requests.length;
    fake.drop();
    await fake.connected(page);
    const hellos = fake.requests.slice(asked).filter((r) => r.type === 'hello');
    assert.deepEqual(hellos, [
      { type: 'hello', name: 'Ada', token: 'secret' },
      { type: 'hello', name: 'Ada', token: 'secret' },
    ]);
    assert.equal(await page.locator('#login-error').textContent(), '');
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
  }
});

test('a name taken while the page was away: the next name is asked with the same token', async () => {
  const fake = new FakeChat();
  const page = await newPage(browser);
  await page.routeWebSocket(/\/chat$/, (ws) => fake.attach(ws));
  try {
    await signIn(page, server.url, 'Ada');
    // Another identity took "Ada" meanwhile: the page is sent back to the
    // sign-in form, but stays the same identity (PROTOCOL.md, "Names and
    // identities"), so its direct messages stay its own.
    fake.taken = new Set(['Ada']);
    fake.drop();
    await page.locator('#login-error', { hasText: 'Pick another name' }).waitFor({ timeout: 20_000 });
    const asked = fake.requests.length;
    await page.locator('#name-input').fill('Ada two');
    await page.locator('#login-button').click();
    const deadline = Date.now() + 10_000;
    let hellos = [];
    while (hellos.length === 0 && Date.now() < deadline) {
      await page.waitForTimeout(50);
      hellos = fake.requests.slice(asked).filter((r) => r.type === 'hello');
    }
    assert.deepEqual(hellos, [{ type: 'hello', name: 'Ada two', token: 'secret' }]);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
  }
});

test('a direct conversation merges its history in order and comes back after a reconnect and a reload', async () => {
  const fake = new FakeChat();
  const page = await newPage(browser);
  await page.routeWebSocket(/\/chat$/, (ws) => fake.attach(ws));
  try {
    await signIn(page, server.url, 'Ada');
    // An older message is kept; a new one arrives live: the page fetches
    // the conversation and puts the older one first.
    fake.dms.push({ id: fake.nextId(), from: 'Zed', to: 'Ada', text: 'earlier', ts: Date.now() - 60_000 });
    const live = { id: fake.nextId(), from: 'Zed', to: 'Ada', text: 'just now', ts: Date.now() };
    fake.dms.push(live);
    fake.send({ type: 'dm', ...live });
    await page.locator(`${sel.dmList} [data-testid="person-Zed"]`).click();
    await waitShown(page, 'earlier');
    assert.deepEqual(await shownTexts(page), ['earlier', 'just now']);

    // Away: Zed writes; back: asked from the last id, shown once.
    fake.drop();
    fake.dms.push({ id: fake.nextId(), from: 'Zed', to: 'Ada', text: 'while you were away', ts: Date.now() });
    await fake.connected(page);
    await waitShown(page, 'while you were away');
    assert.deepEqual(fake.requests.filter((r) => r.type === 'dm_history').at(-1),
      { type: 'dm_history', with: 'Zed', since: live.id, epoch: 'epoch-1' });
    assert.deepEqual(await shownTexts(page), ['earlier', 'just now', 'while you were away']);

    // A reload keeps the conversation open and gets it again from the server.
    await page.reload();
    await fake.connected(page);
    await page.locator(`${sel.dmList} [data-testid="person-Zed"]`).click();
    await waitShown(page, 'while you were away');
    assert.deepEqual(await shownTexts(page), ['earlier', 'just now', 'while you were away']);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
  }
});
