// duplex chat: the page's client of the JSON protocol on /chat (PROTOCOL.md).
// No framework, no build step: plain DOM, served as is by duplex-chat.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const HEARTBEAT_MS = 20000;
  const HEARTBEAT_TIMEOUT_MS = 10000;
  const DEFAULT_ROOM = 'general';
  const NAME_RE = /^[\p{L}\p{N} ._-]{1,32}$/u;

  // ------------------------------------------------------------ state

  const state = {
    conn: 'connecting', // connecting | online | reconnecting | offline
    ws: null,
    attempt: 0,
    retryAt: 0,
    retryTimer: 0,
    countdownTimer: 0,
    heartbeatTimer: 0,
    pongTimer: 0,
    me: null, // our name once welcomed
    wantedName: sessionStorage.getItem('duplex.name') || '',
    token: sessionStorage.getItem('duplex.token') || '',
    instance: null,
    welcomedOnce: false,
    limits: { name_chars: 32, text_chars: 2000, rate: 5, burst: 10, rooms: 20, history: 50 },
    wanted: loadWanted(), // rooms to be in, kept across reconnects and reloads
    // Each conversation keeps the epoch of its stream on the server and the
    // newest message id seen in it: a reconnect asks for what came after
    // that id (`since`), so a dropped connection loses nothing.
    rooms: new Map(), // name -> { name, members, items, unread, joined, keys, epoch, lastId }
    dms: new Map(), // lowercased peer -> { peer, items, unread, keys, epoch, lastId }
    redisDown: false, // the server said its shared store is unreachable
    helloTimer: null, // a hello asked again after `unavailable`
    current: null, // { kind: 'room' | 'dm', key }
    directory: { rooms: [], users: [], online: 0 },
    // Client-side token bucket matching the server's, so the page paces its
    // own requests (rejoining many rooms, fast typing) instead of tripping
    // the server's rate limit.
    bucket: { tokens: 10, last: performance.now() },
    queue: [],
    queueTimer: 0,
  };

  function loadList(key) {
    try {
      const list = JSON.parse(sessionStorage.getItem(key) || '[]');
      return Array.isArray(list) ? list.filter((r) => typeof r === 'string') : [];
    } catch {
      return [];
    }
  }
  function loadWanted() {
    return new Set(loadList('duplex.rooms'));
  }
  // The token is this tab's identity on the server (PROTOCOL.md, "Names and
  // identities"): its direct messages come back with it after a reload or
  // a reconnect, under any name. Signing out forgets it.
  function saveSession() {
    sessionStorage.setItem('duplex.rooms', JSON.stringify([...state.wanted]));
    sessionStorage.setItem('duplex.dms', JSON.stringify([...state.dms.values()].map((d) => d.peer)));
    if (state.me) {
      sessionStorage.setItem('duplex.name', state.me);
      sessionStorage.setItem('duplex.token', state.token);
      localStorage.setItem('duplex.lastName', state.me);
    }
  }

  // ------------------------------------------------------------ connection

  // `?ws=ws://host:port/chat` points the page at another node's socket (that
  // node must allow this page's origin, `--allowed-origin`).
  function wsUrl(path) {
    const other = new URLSearchParams(location.search).get('ws');
    if (other && /^wss?:\/\//.test(other)) return other;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.host}${path}`;
  }

  // Message ids are "<ms>-<seq>" strings (Redis stream ids), ordered within
  // one room or one direct conversation: ms first, then seq.
  function parseId(id) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(String(id));
    return m ? [BigInt(m[1]), BigInt(m[2] || 0)] : null;
  }
  function compareIds(a, b) {
    const x = parseId(a);
    const y = parseId(b);
    if (!x || !y) return String(a) < String(b) ? -1 : String(a) > String(b) ? 1 : 0;
    if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    clearInterval(state.countdownTimer);
    if (state.ws) return;
    setConn(state.welcomedOnce ? 'reconnecting' : 'connecting');
    let ws;
    try {
      ws = new WebSocket(wsUrl('/chat'));
    } catch (err) {
      scheduleReconnect('Could not open a connection');
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      state.bucket = { tokens: state.limits.burst, last: performance.now() };
      state.queue = [];
      if (state.wantedName) {
        sendNow({ type: 'hello', name: state.wantedName, token: state.token || undefined });
      } else {
        setConn('online');
      }
      startHeartbeat();
    };
    ws.onmessage = (e) => {
      let event;
      try {
        event = JSON.parse(e.data);
      } catch {
        return;
      }
      onEvent(event);
    };
    ws.onclose = (e) => {
      if (state.ws !== ws) return;
      dropSocket();
      if (e.code === 4001) {
        // Our name was taken over by another tab with our token.
        setConn('offline', 'Signed in from another tab. Reload to continue here.');
        return;
      }
      const why = e.code === 1001 ? 'The server is restarting' :
        e.code === 1013 ? 'The server asked us to come back later' : 'Connection lost';
      scheduleReconnect(why);
    };
  }

  function dropSocket() {
    const ws = state.ws;
    state.ws = null;
    stopHeartbeat();
    clearTimeout(state.queueTimer);
    state.queue = [];
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try { ws.close(); } catch { /* already closed */ }
    }
  }

  function scheduleReconnect(why) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt);
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    state.attempt += 1;
    state.retryAt = Date.now() + delay;
    state.retryWhy = why;
    setConn('reconnecting');
    state.retryTimer = setTimeout(connect, delay);
    clearInterval(state.countdownTimer);
    state.countdownTimer = setInterval(renderConn, 250);
  }

  function retryNow() {
    if (state.ws) return;
    state.attempt = 0;
    connect();
  }

  function startHeartbeat() {
    stopHeartbeat();
    state.heartbeatTimer = setInterval(() => {
      sendNow({ type: 'ping', id: Date.now() });
      clearTimeout(state.pongTimer);
      state.pongTimer = setTimeout(() => {
        // No pong: the connection is dead even if the browser has not
        // noticed. Drop it and reconnect.
        dropSocket();
        scheduleReconnect('The server stopped answering');
      }, HEARTBEAT_TIMEOUT_MS);
    }, HEARTBEAT_MS);
  }
  function stopHeartbeat() {
    clearInterval(state.heartbeatTimer);
    clearTimeout(state.pongTimer);
  }

  function sendNow(obj) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    takeToken();
    state.ws.send(JSON.stringify(obj));
    return true;
  }

  // Paced sending: a request waits until the bucket has a token.
  function send(obj) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.queue.push(obj);
    pump();
    return true;
  }
  function refill() {
    const now = performance.now();
    const { rate, burst } = state.limits;
    const b = state.bucket;
    if (rate > 0) b.tokens = Math.min(burst, b.tokens + ((now - b.last) / 1000) * rate * 0.95);
    else b.tokens = burst;
    b.last = now;
  }
  function takeToken() {
    refill();
    state.bucket.tokens -= 1;
  }
  function pump() {
    clearTimeout(state.queueTimer);
    while (state.queue.length) {
      refill();
      if (state.bucket.tokens < 1) {
        const wait = ((1 - state.bucket.tokens) / (state.limits.rate * 0.95)) * 1000;
        state.queueTimer = setTimeout(pump, Math.ceil(wait) + 5);
        return;
      }
      sendNow(state.queue.shift());
    }
  }

  // ------------------------------------------------------------ events

  function onEvent(ev) {
    switch (ev.type) {
      case 'directory': onDirectory(ev); break;
      case 'welcome': onWelcome(ev); break;
      case 'joined': onJoined(ev); break;
      case 'left': onLeft(ev); break;
      case 'presence': onPresence(ev); break;
      case 'message': onMessage(ev); break;
      case 'dm': onDm(ev); break;
      case 'dm_history': onDmHistory(ev); break;
      case 'status': onStatus(ev); break;
      case 'gap': onGap(ev); break;
      case 'pong': clearTimeout(state.pongTimer); break;
      case 'error': onError(ev); break;
      default: break;
    }
  }

  function onDirectory(ev) {
    state.directory = { rooms: ev.rooms || [], users: ev.users || [], online: ev.online ?? (ev.users || []).length };
    const n = state.directory.online;
    $('online-count').textContent = n === 0 ? 'nobody online yet' : n === 1 ? '1 person online' : `${n} people online`;
    renderSidebar();
    renderHeader();
    renderMembers();
  }

  function onWelcome(ev) {
    const reconnect = state.welcomedOnce;
    state.me = ev.name;
    state.wantedName = ev.name;
    state.token = ev.token;
    state.instance = ev.instance;
    state.limits = ev.limits || state.limits;
    state.welcomedOnce = true;
    state.attempt = 0;
    state.bucket.tokens = Math.min(state.bucket.tokens, state.limits.burst);
    if (!reconnect) {
      // A reload: the conversations that were open come back.
      for (const peer of loadList('duplex.dms')) {
        if (peer.toLowerCase() !== state.me.toLowerCase()) dmState(peer);
      }
    }
    saveSession();
    // The next directory (gathered by the server for a moment) will list us;
    // until then, count ourselves in.
    if (!state.directory.users.includes(state.me)) {
      state.directory.users = [...state.directory.users, state.me].sort(byName);
      state.directory.online += 1;
    }
    // A new connection starts with the store reachable; a `status` says otherwise.
    state.redisDown = false;
    setConn('online');
    showApp();
    if (reconnect) {
      for (const room of state.rooms.values()) addNotice(room, { system: true, text: 'Reconnected' });
      renderMessages();
    }
    if (state.wanted.size === 0) state.wanted.add(DEFAULT_ROOM);
    const already = new Set(ev.rooms || []);
    for (const room of state.wanted) {
      if (!already.has(room) || reconnect) send(joinRequest(room));
    }
    // Direct conversations: what was said while away (or, after a reload,
    // what the server still keeps).
    for (const dm of state.dms.values()) send(dmHistoryRequest(dm));
    if (!state.current) {
      const first = [...state.wanted][0];
      state.current = { kind: 'room', key: first };
    }
    renderAll();
  }

  function roomState(name) {
    let room = state.rooms.get(name);
    if (!room) {
      room = { name, members: [], items: [], unread: 0, joined: false, keys: new Set(), epoch: null, lastId: null };
      state.rooms.set(name, room);
    }
    return room;
  }
  function dmState(peer) {
    const key = peer.toLowerCase();
    let dm = state.dms.get(key);
    if (!dm) {
      dm = { peer, items: [], unread: 0, keys: new Set(), epoch: null, lastId: null, asked: false };
      state.dms.set(key, dm);
      saveSession();
    }
    return dm;
  }

  // `join`, with where we stopped when we have seen something of the room.
  function joinRequest(name) {
    const room = state.rooms.get(name);
    const req = { type: 'join', room: name };
    if (room && room.lastId && room.epoch) {
      req.since = room.lastId;
      req.epoch = room.epoch;
    }
    return req;
  }
  function dmHistoryRequest(dm) {
    const req = { type: 'dm_history', with: dm.peer };
    if (dm.lastId && dm.epoch) {
      req.since = dm.lastId;
      req.epoch = dm.epoch;
    }
    dm.asked = true;
    return req;
  }

  function trim(conv) {
    if (conv.items.length > 1000) {
      const gone = conv.items.splice(0, conv.items.length - 1000);
      for (const g of gone) if (g.key) conv.keys.delete(g.key);
    }
  }

  function addNotice(conv, notice) {
    conv.items.push({ kind: 'notice', ...notice });
    trim(conv);
  }

  // A new epoch: the server's stream started over, so its ids say nothing
  // about the old ones. What is shown stays; ids are compared afresh.
  function setEpoch(conv, epoch) {
    if (!epoch || conv.epoch === epoch) return;
    if (conv.epoch !== null) {
      conv.keys.clear();
      conv.lastId = null;
    } else {
      // Messages that came before we knew the epoch (a direct message
      // opening a conversation) belong to this one.
      for (const item of conv.items) if (item.kind === 'msg' && item.epoch === null) item.epoch = epoch;
    }
    conv.epoch = epoch;
  }

  // Adds a message unless its id was seen already in this conversation.
  // Returns 'end' when it went at the end, 'inside' when an older message
  // arrived after newer ones (a history merged in) and was put in its
  // place, or false for a repeat.
  function addMessage(conv, item) {
    if (conv.keys.has(item.id)) return false;
    conv.keys.add(item.id);
    item.key = item.id;
    item.epoch = conv.epoch;
    let where = 'end';
    if (conv.lastId === null || compareIds(item.id, conv.lastId) > 0) {
      conv.lastId = item.id;
      conv.items.push(item);
    } else {
      let at = conv.items.length;
      while (at > 0) {
        const other = conv.items[at - 1];
        if (other.kind === 'msg' && other.epoch === conv.epoch && compareIds(other.id, item.id) < 0) break;
        at -= 1;
      }
      // Older than all we show of this epoch: after the last message of an
      // earlier epoch, or first.
      if (at === 0) {
        at = conv.items.findIndex((i) => i.kind === 'msg' && i.epoch === conv.epoch);
        if (at < 0) at = conv.items.length;
      }
      conv.items.splice(at, 0, item);
      where = at === conv.items.length - 1 ? 'end' : 'inside';
    }
    trim(conv);
    return where;
  }

  function lineItem(line) {
    return { kind: 'msg', id: String(line.id), from: line.from, text: line.text, ts: line.ts };
  }

  function onJoined(ev) {
    const room = roomState(ev.room);
    const first = !room.joined;
    room.joined = true;
    room.members = ev.members || [];
    state.wanted.add(ev.room);
    saveSession();
    if (ev.recovered === false) {
      // Never a silent gap: the server could not replay everything since
      // our last message (trimmed, or its store lost it), so say so.
      addNotice(room, { system: true, warn: true, text: `Some messages of #${ev.room} could not be recovered` });
    }
    setEpoch(room, ev.epoch);
    for (const line of ev.history || []) addMessage(room, lineItem(line));
    if (first && room.items.every((i) => i.kind !== 'notice' || !i.you)) {
      addNotice(room, { you: true, text: `You joined #${ev.room}` });
    }
    if (state.pendingSwitch === ev.room || !state.current ||
        (state.current.kind === 'room' && !state.rooms.get(state.current.key))) {
      state.pendingSwitch = null;
      state.current = { kind: 'room', key: ev.room };
    }
    renderAll();
  }

  function onLeft(ev) {
    state.rooms.delete(ev.room);
    state.wanted.delete(ev.room);
    saveSession();
    if (state.current && state.current.kind === 'room' && state.current.key === ev.room) {
      const next = state.rooms.keys().next().value;
      state.current = next ? { kind: 'room', key: next } : null;
    }
    renderAll();
  }

  function byName(a, b) {
    const x = a.toLowerCase();
    const y = b.toLowerCase();
    return x < y ? -1 : x > y ? 1 : a < b ? -1 : a > b ? 1 : 0;
  }

  function onPresence(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    // Presence events are deltas on the list `joined` gave.
    if (ev.event === 'join') {
      if (!room.members.includes(ev.name)) {
        room.members.push(ev.name);
        room.members.sort(byName);
      }
    } else {
      room.members = room.members.filter((n) => n !== ev.name);
    }
    if (ev.name !== state.me) {
      addNotice(room, { text: `${ev.name} ${ev.event === 'join' ? 'joined' : 'left'}` });
      if (isCurrent('room', ev.room)) appendLast(room);
    }
    renderSidebar();
    renderHeader();
    renderMembers();
  }

  function onMessage(ev) {
    const room = state.rooms.get(ev.room);
    if (!room) return;
    const where = addMessage(room, lineItem(ev));
    if (!where) return;
    if (isCurrent('room', ev.room) && document.visibilityState !== 'hidden') {
      if (where === 'end') appendLast(room);
      else renderMessages();
    } else if (ev.from !== state.me) {
      room.unread += 1;
      if (!isCurrent('room', ev.room)) renderSidebar();
    }
    renderTitle();
  }

  function onDm(ev) {
    const mine = ev.from === state.me;
    const peer = mine ? ev.to : ev.from;
    const dm = dmState(peer);
    if (ev.epoch) setEpoch(dm, ev.epoch);
    const where = addMessage(dm, { ...lineItem(ev), dm: true });
    // A conversation new to this page: fetch what the server keeps of it
    // (and its epoch, for recovery after a reconnect).
    if (!dm.asked) send(dmHistoryRequest(dm));
    if (!where) return;
    if (isCurrent('dm', peer.toLowerCase())) {
      if (where === 'end') appendLast(dm);
      else renderMessages();
    } else if (!mine) {
      dm.unread += 1;
      toast(`${ev.from} sent you a direct message`, 'info');
    }
    renderSidebar();
    renderTitle();
  }

  function onDmHistory(ev) {
    if (typeof ev.with !== 'string') return;
    const dm = state.dms.get(ev.with.toLowerCase());
    if (!dm) return;
    if (ev.recovered === false && dm.lastId) {
      addNotice(dm, { system: true, warn: true, text: `Some messages with ${dm.peer} could not be recovered` });
    }
    setEpoch(dm, ev.epoch);
    let inside = false;
    for (const line of ev.history || []) {
      if (addMessage(dm, { ...lineItem(line), dm: true }) === 'inside') inside = true;
    }
    if (isCurrent('dm', ev.with.toLowerCase())) renderMessages();
    else if (inside) renderSidebar();
  }

  function onStatus(ev) {
    if (typeof ev.redis !== 'string') return;
    const down = ev.redis === 'down';
    if (down === state.redisDown) return;
    state.redisDown = down;
    renderConn();
  }

  // Messages of a room were lost before the next one (the store lost or
  // trimmed them before the server could read them): never a silent gap,
  // so say so. What follows belongs to the epoch the server names.
  function onGap(ev) {
    const room = state.rooms.get(ev.room);
    if (!room || !room.joined) return;
    addNotice(room, { system: true, warn: true, text: `Some messages of #${ev.room} could not be recovered` });
    setEpoch(room, ev.epoch);
    renderMessages();
  }

  function onError(ev) {
    const message = ev.message || ev.code;
    if (ev.request === 'hello' && ev.code === 'unavailable') {
      // The server cannot reach its store for now: not a refusal of the
      // name. Ask again in a moment, keeping the name and its token.
      state.redisDown = true;
      renderConn();
      const ws = state.ws;
      clearTimeout(state.helloTimer);
      state.helloTimer = setTimeout(() => {
        if (state.ws === ws && ws.readyState === WebSocket.OPEN && state.wantedName) {
          sendNow({ type: 'hello', name: state.wantedName, token: state.token || undefined });
        }
      }, 1500);
      return;
    }
    if (ev.request === 'hello') {
      // The name is refused: back to the sign-in form. The token stays: it
      // is who we are (our direct messages), whatever name we pick next.
      state.wantedName = '';
      sessionStorage.removeItem('duplex.name');
      if (state.welcomedOnce) {
        state.me = null;
        showLogin();
        $('login-error').textContent = ev.code === 'name_taken'
          ? `While you were away, ${message.replace(/; pick another name$/, '')}. Pick another name.`
          : message;
      } else {
        $('login-error').textContent = message;
      }
      $('login-button').disabled = false;
      setConn('online');
      return;
    }
    if (ev.request === 'join' && ev.room) {
      state.wanted.delete(ev.room);
      saveSession();
    }
    toast(message, ev.code === 'rate_limited' ? 'warn' : 'error');
  }

  // ------------------------------------------------------------ actions

  function submitLogin(e) {
    e.preventDefault();
    const name = $('name-input').value.trim().replace(/\s+/g, ' ');
    if (!NAME_RE.test(name)) {
      $('login-error').textContent = name
        ? 'Use up to 32 letters, digits, spaces, - _ or . only.'
        : 'Please enter a name.';
      return;
    }
    $('login-error').textContent = '';
    state.wantedName = name;
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      $('login-button').disabled = true;
      sendNow({ type: 'hello', name, token: state.token || undefined });
    } else {
      $('login-error').textContent = 'Not connected yet — you will join as soon as the connection is back.';
      retryNow();
    }
  }

  function joinRoom(raw) {
    const room = raw.trim().replace(/^#/, '').replace(/\s+/g, ' ').toLowerCase();
    if (!room) return;
    if (!NAME_RE.test(room)) {
      toast('Room names have 1–32 letters, digits, spaces, - _ or . only.', 'error');
      return;
    }
    const existing = state.rooms.get(room);
    if (existing && existing.joined) {
      switchTo({ kind: 'room', key: room });
      return;
    }
    state.pendingSwitch = room;
    send({ type: 'join', room });
  }

  function leaveCurrent() {
    if (!state.current) return;
    if (state.current.kind === 'room') {
      send({ type: 'leave', room: state.current.key });
    } else {
      state.dms.delete(state.current.key);
      saveSession();
      const next = state.rooms.keys().next().value;
      state.current = next ? { kind: 'room', key: next } : null;
      renderAll();
    }
  }

  function openDm(name) {
    if (name === state.me) return;
    const dm = dmState(name);
    if (!dm.asked) send(dmHistoryRequest(dm));
    switchTo({ kind: 'dm', key: name.toLowerCase() });
  }

  function switchTo(target) {
    state.current = target;
    const conv = currentConv();
    if (conv) conv.unread = 0;
    closeSidebar();
    renderAll();
    $('composer-input').focus();
  }

  function submitMessage(e) {
    if (e) e.preventDefault();
    const input = $('composer-input');
    const text = input.value.replace(/\s+$/, '');
    if (!text.trim() || state.conn !== 'online' || state.redisDown || !state.current) return;
    if ([...text].length > state.limits.text_chars) {
      toast(`A message has at most ${state.limits.text_chars} characters.`, 'error');
      return;
    }
    const request = state.current.kind === 'room'
      ? { type: 'message', room: state.current.key, text }
      : { type: 'dm', to: state.dms.get(state.current.key).peer, text };
    if (send(request)) {
      input.value = '';
      autosize();
      updateCount();
    }
  }

  function signOut() {
    sessionStorage.clear();
    state.wanted = new Set();
    state.me = null;
    state.wantedName = '';
    state.token = '';
    state.rooms.clear();
    state.dms.clear();
    state.current = null;
    state.welcomedOnce = false;
    state.redisDown = false;
    dropSocket();
    state.attempt = 0;
    showLogin();
    connect();
  }

  // ------------------------------------------------------------ rendering

  function isCurrent(kind, key) {
    return !!state.current && state.current.kind === kind && state.current.key === key;
  }
  function currentConv() {
    if (!state.current) return null;
    return state.current.kind === 'room' ? state.rooms.get(state.current.key) : state.dms.get(state.current.key);
  }

  function setConn(conn, detail) {
    state.conn = conn;
    state.connDetail = detail || '';
    if (conn !== 'reconnecting') clearInterval(state.countdownTimer);
    renderConn();
  }

  function renderConn() {
    const conn = state.conn;
    let text;
    let banner = '';
    if (conn === 'online') {
      text = state.me ? 'Online' : 'Connected';
      if (state.redisDown) {
        banner = 'The chat\u2019s message store is unreachable. You can send again once it is back.';
      }
    } else if (conn === 'connecting') {
      text = 'Connecting…';
    } else if (conn === 'reconnecting') {
      const secs = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
      text = state.ws ? 'Reconnecting…' : `Reconnecting in ${secs}s…`;
      banner = state.ws
        ? `${state.retryWhy || 'Connection lost'}. Reconnecting…`
        : `${state.retryWhy || 'Connection lost'}. Reconnecting in ${secs}s…`;
    } else {
      text = 'Offline';
      banner = state.connDetail || 'Offline';
    }
    const el = $('conn-state');
    el.dataset.state = conn;
    $('app').dataset.conn = conn;
    $('conn-text').textContent = text;
    $('login-dot').dataset.state = conn;
    $('login-status').textContent = text;
    $('banner').hidden = !banner;
    $('banner').dataset.state = conn === 'online' && state.redisDown ? 'degraded' : conn;
    $('banner-text').textContent = banner;
    $('retry-button').hidden = conn !== 'reconnecting' || !!state.ws;
    const ready = conn === 'online' && !!state.me && !state.redisDown;
    $('send-button').disabled = !ready;
    $('composer-input').placeholder = ready ? composerPlaceholder()
      : conn === 'online' && state.redisDown ? 'Waiting for the message store…' : 'Waiting for the connection…';
    $('login-button').disabled = conn !== 'online' && conn !== 'reconnecting' && conn !== 'connecting';
  }

  function composerPlaceholder() {
    if (!state.current) return 'Join a room to start';
    return state.current.kind === 'room'
      ? `Message #${state.current.key}`
      : `Message ${state.dms.get(state.current.key)?.peer ?? ''}`;
  }

  function showApp() {
    $('login').hidden = true;
    $('app').hidden = false;
    $('me-name').textContent = state.me;
    paintAvatar($('me-avatar'), state.me);
  }
  function showLogin() {
    $('app').hidden = true;
    $('login').hidden = false;
    const input = $('name-input');
    if (!input.value) input.value = localStorage.getItem('duplex.lastName') || '';
    input.focus();
  }

  function renderAll() {
    renderSidebar();
    renderHeader();
    renderMembers();
    renderMessages();
    renderConn();
    renderTitle();
  }

  // Distinct, readable hues for avatars; a name always gets the same one.
  const HUES = [4, 22, 150, 172, 195, 212, 234, 258, 282, 306, 330, 350];
  function hue(name) {
    let h = 0x811c9dc5; // FNV-1a
    for (const ch of name.toLowerCase()) {
      h ^= ch.codePointAt(0);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return HUES[h % HUES.length];
  }
  function initials(name) {
    const parts = name.split(/[\s._-]+/).filter(Boolean);
    const chars = parts.length > 1 ? [parts[0], parts[1]].map((p) => [...p][0]) : [...name].slice(0, 2);
    return chars.join('');
  }
  function paintAvatar(el, name) {
    el.textContent = initials(name || '?');
    el.style.setProperty('--hue', String(hue(name || '?')));
  }
  function avatar(name) {
    const el = document.createElement('span');
    el.className = 'avatar';
    el.setAttribute('aria-hidden', 'true');
    paintAvatar(el, name);
    return el;
  }
  function node(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function navButton({ active, unread, label, prefix, meta, onClick, testid, title }) {
    const li = document.createElement('li');
    const b = node('button', [active ? 'active' : '', unread ? 'unread' : ''].filter(Boolean).join(' '));
    b.type = 'button';
    if (testid) b.dataset.testid = testid;
    if (prefix) b.append(prefix);
    b.append(node('span', 'label', label));
    if (unread) b.append(node('span', 'badge', String(unread > 99 ? '99+' : unread)));
    else if (meta !== undefined) {
      const m = node('span', 'meta', meta);
      if (title) m.title = `${meta} ${title}`;
      b.append(m);
    }
    b.addEventListener('click', onClick);
    li.append(b);
    return li;
  }

  function isOnline(name) {
    const key = name.toLowerCase();
    return state.directory.users.some((u) => u.toLowerCase() === key);
  }

  function personButton(name, { active, unread, withMeta } = {}) {
    const wrap = document.createDocumentFragment();
    wrap.append(avatar(name), node('span', isOnline(name) ? 'presence' : 'presence away'));
    return navButton({
      active,
      unread,
      label: name,
      prefix: wrap,
      meta: withMeta && name === state.me ? 'you' : undefined,
      onClick: () => openDm(name),
      testid: `person-${name}`,
    });
  }

  function renderSidebar() {
    const rooms = $('room-list');
    rooms.replaceChildren();
    for (const room of [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      rooms.append(navButton({
        active: isCurrent('room', room.name),
        unread: room.unread,
        label: room.name,
        prefix: node('span', 'hash', '#'),
        meta: String(room.members.length),
        title: 'people in the room',
        onClick: () => switchTo({ kind: 'room', key: room.name }),
        testid: `room-${room.name}`,
      }));
    }
    const others = $('other-rooms');
    others.replaceChildren();
    for (const r of state.directory.rooms) {
      if (state.rooms.has(r.name)) continue;
      others.append(navButton({
        label: r.name,
        prefix: node('span', 'hash', '#'),
        meta: r.members ? `${r.members}` : '',
        onClick: () => joinRoom(r.name),
        testid: `other-room-${r.name}`,
      }));
    }

    const dms = $('dm-list');
    dms.replaceChildren();
    for (const [key, dm] of state.dms) {
      dms.append(personButton(dm.peer, { active: isCurrent('dm', key), unread: dm.unread }));
    }
    $('dm-empty').hidden = state.dms.size > 0;

    const users = $('user-list');
    users.replaceChildren();
    for (const name of state.directory.users) {
      users.append(personButton(name, { withMeta: true }));
    }
    $('online-total').textContent = String(state.directory.online);
  }

  function renderHeader() {
    const conv = currentConv();
    const title = $('chat-title');
    const subtitle = $('chat-subtitle');
    const leave = $('leave-button');
    const members = $('members-button');
    if (!state.current || !conv) {
      title.textContent = 'No room';
      subtitle.textContent = 'Join a room from the sidebar';
      leave.hidden = true;
      members.hidden = true;
      return;
    }
    if (state.current.kind === 'room') {
      title.textContent = `# ${conv.name}`;
      const n = conv.members.length;
      subtitle.textContent = n === 1 ? 'Just you here' : `${n} members`;
      leave.textContent = 'Leave';
      leave.hidden = false;
      members.hidden = false;
      $('members-count').textContent = String(n);
    } else {
      const online = isOnline(conv.peer);
      title.textContent = conv.peer;
      subtitle.textContent = online ? 'Direct message · online' : 'Direct message · offline';
      leave.textContent = 'Close';
      leave.hidden = false;
      members.hidden = true;
    }
    $('composer-input').placeholder = state.conn === 'online' && !state.redisDown ? composerPlaceholder()
      : state.conn === 'online' ? 'Waiting for the message store…' : 'Waiting for the connection…';
  }

  function renderMembers() {
    const list = $('member-list');
    list.replaceChildren();
    const conv = currentConv();
    const panel = $('members-panel');
    if (!conv || state.current.kind !== 'room') {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    for (const name of conv.members) list.append(personButton(name, { withMeta: true }));
  }

  function renderTitle() {
    let unread = 0;
    for (const r of state.rooms.values()) unread += r.unread;
    for (const d of state.dms.values()) unread += d.unread;
    document.title = unread ? `(${unread}) duplex chat` : 'duplex chat';
  }

  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

  // Message text as DOM nodes, never as HTML: `code` spans and http(s) links.
  function richText(parent, text) {
    const parts = text.split(/(`[^`\n]+`)/);
    for (const part of parts) {
      if (part.length > 2 && part.startsWith('`') && part.endsWith('`')) {
        parent.append(node('code', '', part.slice(1, -1)));
      } else {
        linkify(parent, part);
      }
    }
  }

  function linkify(parent, text) {
    const re = /\bhttps?:\/\/[^\s<>"]+[^\s<>".,;:!?)\]'}]/g;
    let last = 0;
    for (const m of text.matchAll(re)) {
      parent.append(text.slice(last, m.index));
      const a = node('a', '', m[0]);
      a.href = m[0];
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      parent.append(a);
      last = m.index + m[0].length;
    }
    parent.append(text.slice(last));
  }

  function itemNode(item, prev) {
    if (item.kind === 'notice') {
      const n = node('div', `notice${item.system ? ' system' : ''}${item.warn ? ' warn' : ''}`, item.text);
      n.dataset.testid = 'notice';
      return n;
    }
    const first = !prev || prev.kind !== 'msg' || prev.from !== item.from || item.ts - prev.ts > 5 * 60 * 1000;
    const row = node('div', `msg${first ? ' first' : ''}${item.from === state.me ? ' mine' : ''}`);
    row.dataset.testid = 'message';
    row.dataset.id = item.id;
    row.dataset.from = item.from;
    row.append(avatar(item.from));
    const head = node('div', 'head');
    head.append(node('span', 'from', item.from));
    const time = node('time', 'time', timeFormat.format(new Date(item.ts)));
    time.dateTime = new Date(item.ts).toISOString();
    time.title = fullFormat.format(new Date(item.ts));
    head.append(time);
    const text = node('div', 'text');
    richText(text, item.text);
    row.append(head, text);
    return row;
  }

  function emptyState() {
    const box = node('div', 'empty');
    if (!state.current) {
      box.append(node('div', 'big', '#'), node('strong', '', 'You are not in any room'), node('span', '', 'Join or create one from the sidebar.'));
    } else if (state.current.kind === 'room') {
      box.append(node('div', 'big', '#'), node('strong', '', `Welcome to #${state.current.key}`), node('span', '', 'No messages yet. Say hi!'));
    } else {
      const peer = state.dms.get(state.current.key)?.peer ?? '';
      box.append(avatar(peer), node('strong', '', peer), node('span', '', 'Only the two of you see these messages.'));
    }
    return box;
  }

  function renderMessages() {
    const list = $('messages');
    const conv = currentConv();
    list.replaceChildren();
    if (!conv || !conv.items.some((i) => i.kind === 'msg')) {
      if (conv) {
        for (const item of conv.items) list.append(itemNode(item, null));
      }
      list.append(emptyState());
      return;
    }
    let prev = null;
    for (const item of conv.items) {
      list.append(itemNode(item, prev));
      prev = item;
    }
    list.scrollTop = list.scrollHeight;
  }

  function appendLast(conv) {
    const list = $('messages');
    if (list.querySelector('.empty')) {
      renderMessages();
      return;
    }
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 120;
    const items = conv.items;
    const item = items[items.length - 1];
    const prev = items.length > 1 ? items[items.length - 2] : null;
    const mine = item.kind === 'msg' && item.from === state.me;
    list.append(itemNode(item, prev));
    if (nearBottom || mine) list.scrollTop = list.scrollHeight;
  }

  function toast(text, kind) {
    const box = $('toasts');
    const t = node('div', `toast ${kind || 'info'}`, text);
    box.append(t);
    while (box.children.length > 4) box.firstChild.remove();
    setTimeout(() => t.remove(), kind === 'error' ? 6000 : 4000);
  }

  // ------------------------------------------------------------ composer

  function autosize() {
    const t = $('composer-input');
    t.style.height = 'auto';
    t.style.height = `${Math.min(t.scrollHeight, 180)}px`;
  }
  function updateCount() {
    const n = [...$('composer-input').value].length;
    const max = state.limits.text_chars;
    const el = $('char-count');
    el.textContent = n > max * 0.8 ? `${n}/${max}` : '';
    el.classList.toggle('over', n > max);
  }

  function openSidebar() {
    $('sidebar').classList.add('open');
    $('backdrop').hidden = false;
  }
  function closeSidebar() {
    $('sidebar').classList.remove('open');
    $('backdrop').hidden = true;
  }

  // ------------------------------------------------------------ wiring

  function init() {
    $('login-form').addEventListener('submit', submitLogin);
    $('join-form').addEventListener('submit', (e) => {
      e.preventDefault();
      joinRoom($('room-input').value);
      $('room-input').value = '';
    });
    $('composer').addEventListener('submit', submitMessage);
    const input = $('composer-input');
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submitMessage();
      }
    });
    input.addEventListener('input', () => {
      autosize();
      updateCount();
    });
    $('leave-button').addEventListener('click', leaveCurrent);
    $('retry-button').addEventListener('click', retryNow);
    $('signout-button').addEventListener('click', signOut);
    $('menu-button').addEventListener('click', openSidebar);
    $('sidebar-close').addEventListener('click', closeSidebar);
    $('backdrop').addEventListener('click', closeSidebar);
    $('members-button').addEventListener('click', () => $('members-panel').classList.toggle('open'));
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') {
        const conv = currentConv();
        if (conv && conv.unread) {
          conv.unread = 0;
          renderAll();
        }
      }
    });
    window.addEventListener('online', retryNow);

    if (state.wantedName) {
      // A reload: sign in again with the same name, quietly.
      $('name-input').value = state.wantedName;
    } else {
      showLogin();
    }
    renderConn();
    connect();
  }

  // For tests and curious people: a read-only view of the state.
  Object.defineProperty(window, 'duplexChat', {
    value: Object.freeze({
      get state() {
        return {
          conn: state.conn,
          me: state.me,
          current: state.current,
          rooms: [...state.rooms.keys()],
          instance: state.instance,
          redisDown: state.redisDown,
          // Where each conversation stands: its stream's epoch and last id.
          marks: Object.fromEntries([
            ...[...state.rooms.values()].map((r) => [`#${r.name}`, { epoch: r.epoch, lastId: r.lastId }]),
            ...[...state.dms.values()].map((d) => [`@${d.peer}`, { epoch: d.epoch, lastId: d.lastId }]),
          ]),
        };
      },
    }),
  });

  init();
})();
