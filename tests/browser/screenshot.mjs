// Makes the README's picture of the chat page (docs/chat.png): a short
// conversation between four people, seen by one of them.
//
//   node tests/browser/screenshot.mjs [OUTPUT.png]   (default: $BROWSER_OUT/readme-chat.png)
//
// Needs what the browser tests need (README.md in this folder).

import { join } from 'node:path';

import { freePort, launchBrowser, newPage, OUT, say, sel, signIn, startServer, waitForMessage } from './harness.mjs';

const output = process.argv[2] || join(OUT, 'readme-chat.png');
const server = await startServer(await freePort(), { log: 'server-screenshot' });
const browser = await launchBrowser();
try {
  const [ada, grace, linus, margaret] = await Promise.all([
    newPage(browser), newPage(browser), newPage(browser), newPage(browser),
  ]);
  await signIn(grace, server.url, 'Grace Hopper');
  await signIn(linus, server.url, 'Linus');
  await signIn(ada, server.url, 'Ada Lovelace');

  const join = async (page, room) => {
    await page.locator('#room-input').fill(room);
    await page.locator('#room-input').press('Enter');
    await page.locator(sel.title, { hasText: `# ${room}` }).waitFor();
  };
  await join(ada, 'design');
  await join(grace, 'design');
  await join(linus, 'release-0.2');
  for (const page of [ada, grace, linus]) {
    await page.locator(`${sel.roomList} [data-testid="room-general"]`).click();
  }

  const line = async (page, text) => {
    await say(page, text);
    await waitForMessage(ada, text.replaceAll('`', ''));
  };
  await line(grace, 'Morning all! The hub landed on main last night.');
  await line(linus, 'Nice. Does a publish still frame the message only once?');
  await line(grace, 'Once per encoding: plain frames and each stateless deflate setup share the same bytes.');
  await line(grace, 'A slow reader never holds up the room either, it gets closed with 1013 and reconnects.');
  await line(ada, 'I tried 1,000 clients on my laptop and it did not blink. Numbers are in the PR.');
  await signIn(margaret, server.url, 'Margaret');
  await line(margaret, 'Just in time. Is this the page that `cargo run --release -p duplex-chat` serves?');
  await line(ada, 'Yes: run it, open http://127.0.0.1:8080 and pick a name. That is all.');
  await grace.locator(`${sel.roomList} [data-testid="room-design"]`).click();
  await say(grace, 'Sketches for the new sidebar are up, have a look when you can.');
  await linus.locator(`${sel.userList} [data-testid="person-Ada Lovelace"]`).click();
  await say(linus, 'Got a minute after lunch? Want to pair on the backplane.');
  await ada.locator(`${sel.dmList} .badge`).waitFor();
  await ada.locator(`${sel.roomList} [data-testid="room-design"] .badge`).waitFor();
  // Let the toast fade.
  await ada.waitForTimeout(4500);
  await ada.locator(sel.composer).fill('Sounds good!');
  await ada.screenshot({ path: output });
  console.log(`wrote ${output}`);
} finally {
  await browser.close();
  await server.stop();
}
