// Shared pieces of the browser tests: the duplex-chat binary on a free
// loopback port, Debian's Chromium through playwright-core, screenshots.
//
// Environment:
//   DUPLEX_CHAT_BIN  the server binary (default $CARGO_TARGET_DIR/release/duplex-chat,
//                    CARGO_TARGET_DIR defaulting to ~/.cache/duplex/target)
//   BROWSER_OUT      where screenshots and server logs go (default tests/browser/out)
//   CHROMIUM         the browser (default /usr/bin/chromium)

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, openSync, closeSync } from 'node:fs';
import net from 'node:net';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const targetDir = process.env.CARGO_TARGET_DIR || join(homedir(), '.cache', 'duplex', 'target');

export const SERVER_BIN = process.env.DUPLEX_CHAT_BIN || join(targetDir, 'release', 'duplex-chat');
export const OUT = process.env.BROWSER_OUT || join(here, 'out');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

mkdirSync(OUT, { recursive: true });

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Fails with the reason when something the tests need is missing. */
export function checkPrerequisites() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install it with ` +
      '`apt-get update && apt-get install -y chromium` (.ci/run does) or set CHROMIUM');
  }
  if (!existsSync(SERVER_BIN)) {
    throw new Error(`duplex-chat not found at ${SERVER_BIN}: run ` +
      '`cargo build --release -p duplex-chat` or set DUPLEX_CHAT_BIN');
  }
}

/**
 * Headless Chromium. playwright's launch gives it a fresh, temporary
 * user-data-dir (removed on close); each test user gets its own context.
 */
export async function launchBrowser() {
  checkPrerequisites();
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A duplex-chat process on 127.0.0.1:port; resolves once it accepts. */
export async function startServer(port, { log = 'server', args = [] } = {}) {
  const logFd = openSync(join(OUT, `${log}.log`), 'a');
  const child = spawn(SERVER_BIN, ['--addr', `127.0.0.1:${port}`, '--shutdown-grace', '2', ...args], {
    stdio: ['ignore', logFd, logFd],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  closeSync(logFd);
  let exited = null;
  child.once('exit', (code, signal) => {
    exited = { code, signal };
  });
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (exited) {
      throw new Error(`duplex-chat exited early (${JSON.stringify(exited)}); see ${join(OUT, `${log}.log`)}`);
    }
    if (await canConnect(port)) {
      return {
        child,
        port,
        url: `http://127.0.0.1:${port}`,
        /** Stops it with `signal` and waits until it has exited. */
        async stop(signal = 'SIGTERM') {
          if (exited) return exited;
          const done = new Promise((resolve) => child.once('exit', (code, sig) => resolve({ code, signal: sig })));
          child.kill(signal);
          const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
          const result = await done;
          clearTimeout(timer);
          return result;
        },
      };
    }
    await sleep(50);
  }
  child.kill('SIGKILL');
  throw new Error(`duplex-chat did not listen on port ${port} within 15 s`);
}

/**
 * A page in its own browser context (its own storage), with every page
 * error and console error collected in `page.problems`.
 */
export async function newPage(browser, { width = 1280, height = 800 } = {}) {
  const context = await browser.newContext({ viewport: { width, height }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.problems = [];
  // Every JSON event the page's WebSockets received, in order, counted
  // before the page's own de-duplication can hide a repeat.
  page.events = [];
  page.on('websocket', (ws) => {
    ws.on('framereceived', ({ payload }) => {
      if (typeof payload !== 'string') return;
      try {
        page.events.push(JSON.parse(payload));
      } catch {
        // Not JSON: a socket other than /chat's.
      }
    });
  });
  page.on('pageerror', (err) => page.problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    // A refused reconnect attempt while the server is down is expected.
    if (/WebSocket connection to .* failed/.test(text)) return;
    if (/Failed to load resource: net::ERR_CONNECTION_REFUSED/.test(text)) return;
    page.problems.push(`console error: ${text}`);
  });
  return page;
}

export async function screenshot(page, name) {
  const path = join(OUT, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

// ------------------------------------------------------------ the chat page

export const sel = {
  connState: '[data-testid="conn-state"]',
  title: '[data-testid="chat-title"]',
  messages: '[data-testid="messages"]',
  composer: '[data-testid="composer-input"]',
  memberList: '[data-testid="member-list"]',
  userList: '[data-testid="user-list"]',
  dmList: '[data-testid="dm-list"]',
  roomList: '[data-testid="room-list"]',
  banner: '[data-testid="banner"]',
  loginError: '[data-testid="login-error"]',
};

/** Opens the page and signs in; resolves in #general, online. */
export async function signIn(page, baseUrl, name) {
  await page.goto(`${baseUrl}/`);
  await page.locator('#name-input').fill(name);
  await page.locator('#login-button').click();
  await waitOnline(page);
  await page.locator(sel.title, { hasText: '# general' }).waitFor();
  await page.locator(sel.memberList, { hasText: name }).waitFor({ state: 'attached' });
}

export async function waitOnline(page, timeout = 10_000) {
  await page.locator(`${sel.connState}[data-state="online"]`).waitFor({ state: 'attached', timeout });
}

/** Types a message in the composer and sends it with Enter. */
export async function say(page, text) {
  const composer = page.locator(sel.composer);
  await composer.fill(text);
  await composer.press('Enter');
}

/** The message texts shown in the current conversation. */
export async function messageTexts(page) {
  return page.locator(`${sel.messages} .msg .text`).allInnerTexts();
}

export async function waitForMessage(page, text, timeout = 10_000) {
  await page.locator(`${sel.messages} .msg .text`, { hasText: text }).waitFor({ timeout });
}

// ------------------------------------------------------------ frames received

/** The `type` events the page received whose fields include `fields`. */
export function eventsReceived(page, type, fields = {}) {
  return page.events.filter(
    (e) => e.type === type && Object.entries(fields).every(([k, v]) => e[k] === v),
  );
}

/**
 * Checks that the page received, as `type` events, exactly the texts given,
 * each once and in that order, and no other event of that type: waits for
 * the last, then a quiet spell (a repeat sent right after arrives within
 * it on loopback), then counts the frames.
 */
export async function assertReceivedExactly(page, type, texts, { quiet = 300, timeout = 10_000 } = {}) {
  const deadline = Date.now() + timeout;
  const seenAll = () => texts.every((text) => eventsReceived(page, type, { text }).length > 0);
  while (!seenAll()) {
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, quiet));
  const got = eventsReceived(page, type).map((e) => e.text);
  if (JSON.stringify(got) !== JSON.stringify(texts)) {
    throw new Error(`${type} frames received: ${JSON.stringify(got)}, expected each of ${JSON.stringify(texts)} exactly once`);
  }
}

// ------------------------------------------------------------ several nodes

export const REDIS_SERVER = process.env.REDIS_SERVER || 'redis-server';

/**
 * A redis-server of the test's own on 127.0.0.1:port, nothing saved (it
 * stays up for the whole test, so persistence is not what is tested).
 * Fails, saying why, when redis-server is missing; never skips.
 */
export async function startRedis(port, { log = 'redis' } = {}) {
  const logFd = openSync(join(OUT, `${log}.log`), 'a');
  const child = spawn(REDIS_SERVER, [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
  ], { stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  let exited = null;
  child.once('error', (err) => {
    exited = { error: err.message };
  });
  child.once('exit', (code, signal) => {
    exited = exited || { code, signal };
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (exited) {
      throw new Error(`cannot start ${REDIS_SERVER} (${JSON.stringify(exited)}): install it with ` +
        '`apt-get install -y redis-server` (.ci/run does) or set REDIS_SERVER; ' +
        `see ${join(OUT, `${log}.log`)}`);
    }
    if (await canConnect(port)) {
      return {
        child,
        port,
        url: `redis://127.0.0.1:${port}/`,
        async stop() {
          if (exited) return exited;
          const done = new Promise((resolve) => child.once('exit', (code, sig) => resolve({ code, signal: sig })));
          child.kill('SIGKILL');
          return done;
        },
      };
    }
    await sleep(50);
  }
  child.kill('SIGKILL');
  throw new Error(`redis-server did not listen on port ${port} within 10 s`);
}

/**
 * A TCP relay on 127.0.0.1 in front of `targetPort`: a page loaded through
 * it talks to the server only through it, so `cut()` drops that page's
 * connection (and refuses new ones) while the server and every other page
 * go on; `restore()` lets connections through again.
 */
export async function startRelay(targetPort) {
  const sockets = new Set();
  let open = true;
  const server = net.createServer((client) => {
    if (!open) {
      client.destroy();
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
    sockets.add(client);
    sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    cut() {
      open = false;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    restore() {
      open = true;
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/**
 * The messages the current conversation shows, as `{ id, text }`, in the
 * order shown: what a person sees, repeats included.
 */
export async function shownMessages(page) {
  return page.locator(`${sel.messages} .msg`).evaluateAll((rows) => rows.map((row) => ({
    id: row.dataset.id,
    text: row.querySelector('.text').innerText,
  })));
}
