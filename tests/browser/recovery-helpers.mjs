// Helpers of the recovery tests (recovery.test.mjs, cluster.test.mjs): what
// a page shows of a conversation, and its recovery notices.

import assert from 'node:assert/strict';

import { eventsReceived, sel, shownMessages } from './harness.mjs';

export const ID_SHAPE = /^\d+-\d+$/;

/**
 * Checks that the current conversation shows exactly `texts`, in that
 * order, each once, under distinct ids of the "<ms>-<seq>" shape.
 */
export async function assertShows(page, texts, what) {
  const deadline = Date.now() + 10_000;
  let shown = await shownMessages(page);
  // Wait for the last one, then check everything at once.
  while (!shown.some((m) => m.text === texts.at(-1)) && Date.now() < deadline) {
    await page.waitForTimeout(50);
    shown = await shownMessages(page);
  }
  // A repeat would come right after; give it the chance to show.
  await page.waitForTimeout(300);
  shown = await shownMessages(page);
  assert.deepEqual(shown.map((m) => m.text), texts, `${what}: the messages shown`);
  const ids = shown.map((m) => m.id);
  assert.equal(new Set(ids).size, ids.length, `${what}: an id shown twice: ${JSON.stringify(ids)}`);
  for (const id of ids) assert.match(id, ID_SHAPE, `${what}: message id`);
}

export async function openRoom(page, room) {
  await page.locator(`${sel.roomList} [data-testid="room-${room}"]`).click();
  await page.locator(sel.title, { hasText: `# ${room}` }).waitFor();
}

export async function openDmWith(page, peer) {
  await page.locator(`${sel.dmList} [data-testid="person-${peer}"]`).click();
  await page.locator(sel.title, { hasText: peer }).waitFor();
}

export function warnings(page) {
  return page.locator(`${sel.messages} .notice.warn`);
}

/** The `joined` answers the page got for `room` with a `since` in the request. */
export function recoveries(page, room) {
  return eventsReceived(page, 'joined', { room }).filter((e) => 'recovered' in e);
}

