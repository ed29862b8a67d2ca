// Browser test of the web page with sign-in (examples/web.rs --sign-in ldap), in real
// headless Chromium against the lab's slapd and services: who may sign in, who sees and
// may act on which VM, the trusted proxy header, and a server that holds under 200 idle
// websockets and 20 stalled readers.
//
//   node tests/web/signin.mjs --url http://127.0.0.1:PORT/ --pid SERVER_PID \
//        --password-file FILE --results FILE
//
// The server runs with --admin-group (carol is the lab's admin), --trusted-header
// X-Remote-User --trusted-proxy 127.0.0.2, --max-connections 230 (filled to the cap here). Run by scripts/test-web
// inside the lab's network namespace.

import { chromium } from 'playwright-core';
import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { randomBytes } from 'node:crypto';

const opts = {};
for (let i = 2; i < process.argv.length; i += 2) opts[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const url = new URL(opts.url);
const password = readFileSync(opts['password-file'], 'utf8').trim();
const serverPid = Number(opts.pid);
const RUN_LIMIT = 180_000;

let passed = 0;
let failed = 0;
function check(name, ok, detail) {
  if (ok) {
    passed += 1;
    console.log(`ok   ${name}`);
  } else {
    failed += 1;
    console.log(`FAIL ${name}${detail === undefined ? '' : ': ' + detail}`);
  }
  return ok;
}
async function section(name, fn) {
  const t = Date.now();
  console.log(`-- ${name}`);
  try {
    await fn();
  } catch (e) {
    check(`${name} (ran to the end)`, false, e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : String(e));
  }
  console.log(`   (${((Date.now() - t) / 1000).toFixed(1)} s)`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The server's resident memory in KiB (same pid namespace: the lab's netns shares it).
function rssKiB() {
  const m = readFileSync(`/proc/${serverPid}/status`, 'utf8').match(/^VmRSS:\s+(\d+)/m);
  return m ? Number(m[1]) : NaN;
}

// A plain HTTP request from `localAddress`, with `headers`; resolves { status, body }.
function request(path, { method = 'GET', headers = {}, localAddress = '127.0.0.1', body } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: url.hostname, port: url.port, path, method, localAddress,
      headers: { host: url.host, ...headers },
    }, (res) => {
      let data = '';
      res.on('data', (c) => { data += c; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

// A raw websocket over TCP: the upgrade, then optionally one text frame; it never reads
// unless asked (`replies()` reads what came, as text frames, until close or `ms`).
function rawSocket({ cookie, headers = {}, localAddress = '127.0.0.1', send } = {}) {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: url.hostname, port: Number(url.port), localAddress });
    let buf = Buffer.alloc(0);
    let upgraded = false;
    const frames = [];
    let closed = false;
    s.on('error', () => { closed = true; });
    s.on('close', () => { closed = true; });
    s.on('connect', () => {
      const lines = [
        'GET /ws HTTP/1.1', `Host: ${url.host}`, 'Upgrade: websocket', 'Connection: Upgrade',
        `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`, 'Sec-WebSocket-Version: 13',
      ];
      if (cookie) lines.push(`Cookie: ${cookie}`);
      for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
      s.write(lines.join('\r\n') + '\r\n\r\n');
    });
    const parse = () => {
      while (buf.length >= 2) {
        const len0 = buf[1] & 0x7f;
        let off = 2;
        let len = len0;
        if (len0 === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
        if (len0 === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
        if (buf.length < off + len) return;
        const opcode = buf[0] & 0x0f;
        if (opcode === 1) frames.push(JSON.parse(buf.subarray(off, off + len).toString()));
        buf = buf.subarray(off + len);
      }
    };
    s.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      if (!upgraded) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end).toString();
        buf = buf.subarray(end + 4);
        upgraded = true;
        const status = Number(head.split(' ')[1]);
        const sock = {
          status, socket: s, frames,
          isClosed: () => closed,
          // Stops reading: what the server sends piles up in the kernel, then in the server.
          stall() { s.pause(); },
          async replies(ms) {
            const t = Date.now();
            while (!closed && Date.now() - t < ms) await sleep(20);
            parse();
            return frames;
          },
          close() { s.destroy(); },
        };
        if (status === 101 && send !== undefined) {
          const payload = Buffer.from(JSON.stringify(send));
          const mask = randomBytes(4);
          const header = payload.length < 126
            ? Buffer.from([0x81, 0x80 | payload.length])
            : Buffer.from([0x81, 0x80 | 126, payload.length >> 8, payload.length & 0xff]);
          const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
          s.write(Buffer.concat([header, mask, masked]));
        }
        resolve(sock);
      }
      parse();
    });
    setTimeout(() => { if (!upgraded) reject(new Error('no upgrade answer')); }, 30_000);
  });
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-quic'],
});

async function signedInPage(user, pw = password) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  const page = await context.newPage();
  await page.goto(url.href);
  await page.locator('#login').waitFor({ state: 'visible', timeout: 10_000 });
  await page.fill('#login-user', user);
  await page.fill('#login-password', pw);
  await page.click('#login-submit');
  return { context, page };
}

async function finish(card) {
  const t = Date.now();
  while (Date.now() - t < RUN_LIMIT) {
    if ((await card.getAttribute('data-state')) !== 'running') return;
    await sleep(50);
  }
}

async function wsCommand(page, command) {
  return page.evaluate((command) => new Promise((resolve) => {
    const ws = new WebSocket(`ws://${location.host}/ws`);
    const replies = [];
    ws.onopen = () => ws.send(command);
    ws.onmessage = (m) => replies.push(JSON.parse(m.data));
    ws.onclose = () => resolve(replies);
  }), JSON.stringify(command));
}

const vms = await (async () => [])();
let alice;
let aliceVm;
let aliceCookie;
try {
  await section('who may sign in', async () => {
    const anon = await request('/api/vms');
    check('without a session the list is refused (401)', anon.status === 401, `${anon.status} ${anon.body}`);
    const me = JSON.parse((await request('/api/me')).body);
    check('/api/me offers ldap sign-in and says no one is signed in', me.sign_in.includes('ldap') && me.signed_in === false, JSON.stringify(me));

    const wrong = await signedInPage('alice', password + 'x');
    const err = wrong.page.locator('#login-error');
    await err.filter({ hasText: /./ }).waitFor({ timeout: 10_000 });
    check('a wrong password is refused with a clear message', /wrong user name or password/.test(await err.textContent()), await err.textContent());
    check('... and the page stays at the login form', await wrong.page.locator('#login').isVisible() && !(await wrong.page.locator('#main').isVisible()));
    await wrong.context.close();

    const dave = await signedInPage('dave');
    const derr = dave.page.locator('#login-error');
    await derr.filter({ hasText: /./ }).waitFor({ timeout: 10_000 });
    check('a non-member with the right password is refused, naming the group', /not a member/.test(await derr.textContent()), await derr.textContent());
    await dave.context.close();

    const raw = await request('/api/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user: 'alice', password: '' }) });
    check('an empty password is refused (no anonymous bind)', raw.status === 401, `${raw.status} ${raw.body}`);

    // Another spelling of a name is the same user; signing out kills the token itself.
    const login = (user) => request('/api/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user, password }) });
    const shouted = await login('ALICE');
    check('ALICE signs in as alice (the directory\'s spelling)', shouted.status === 200 && JSON.parse(shouted.body).user === 'alice', shouted.body);
    const token = (shouted.headers['set-cookie'] || [''])[0].split(';')[0];
    check('the token works', (await request('/api/vms', { headers: { cookie: token } })).status === 200);
    await request('/api/logout', { method: 'POST', headers: { cookie: token } });
    const after = await request('/api/vms', { headers: { cookie: token } });
    check('after sign-out the same token is refused', after.status === 401, `${after.status}`);
    const twice = await request('/api/vms', { headers: { cookie: `${token}; ${token}` } });
    check('two session cookies at once are refused, not guessed between', twice.status === 401, `${twice.status}`);
  });

  await section('alice signs in, deploys, and sees only her own VMs', async () => {
    alice = await signedInPage('alice');
    await alice.page.locator('#whoami-name').filter({ hasText: 'alice' }).waitFor({ timeout: 10_000 });
    check('the page says who is signed in', (await alice.page.locator('#whoami-name').textContent()).includes('signed in as alice'));
    const cookies = await alice.context.cookies();
    const session = cookies.find((c) => c.name === 'devvm_session');
    check('the session cookie is HttpOnly and SameSite=Strict with an expiry', session && session.httpOnly && session.sameSite === 'Strict' && session.expires > Date.now() / 1000, JSON.stringify(session));
    check('the page script cannot read the cookie', (await alice.page.evaluate(() => document.cookie)) === '');
    aliceCookie = `devvm_session=${session.value}`;
    check('the user field is alice\'s own, read-only', (await alice.page.inputValue('#user')) === 'alice' && await alice.page.locator('#user').evaluate((e) => e.readOnly));
    await alice.page.click('#deploy');
    const card = alice.page.locator('.run').first();
    await card.waitFor();
    await finish(card);
    check('alice\'s deploy ends in success', (await card.getAttribute('data-state')) === 'done', await card.locator('.end').textContent());
    aliceVm = await card.getAttribute('data-vm');
    vms.push(aliceVm);
    await alice.page.locator(`#vms li[data-vm="${aliceVm}"]`).waitFor({ timeout: 10_000 });
    const listed = await alice.page.locator('#vms li').evaluateAll((l) => l.map((e) => e.dataset.vm));
    check('alice\'s list shows only alice\'s VMs', listed.length > 0 && listed.every((n) => n.startsWith('alice-')), listed.join(' '));
    const forBob = await wsCommand(alice.page, { op: 'provision', user: 'bob' });
    check('alice cannot provision for bob (raw websocket)', forBob.length === 1 && forBob[0].type === 'error' && forBob[0].error.kind === 'unauthorized', JSON.stringify(forBob));
  });

  await section('bob cannot see or delete alice\'s VM', async () => {
    const bob = await signedInPage('bob');
    await bob.page.locator('#whoami-name').filter({ hasText: 'bob' }).waitFor({ timeout: 10_000 });
    await bob.page.locator('#vms-status').filter({ hasText: /VM/ }).waitFor({ timeout: 10_000 });
    check('bob\'s list has no delete button for alice\'s VM (it is not listed)', (await bob.page.locator(`#vms li[data-vm="${aliceVm}"]`).count()) === 0);
    const del = await wsCommand(bob.page, { op: 'deprovision', vm: aliceVm });
    check('bob\'s raw deprovision of alice\'s VM is unauthorized', del.length === 1 && del[0].type === 'error' && del[0].error.kind === 'unauthorized' && /belongs to alice/.test(del[0].error.message), JSON.stringify(del));
    const mv = await wsCommand(bob.page, { op: 'migrate', vm: aliceVm, to: 'qemu:///system' });
    check('... and so is a migrate', mv.length === 1 && mv[0].error && mv[0].error.kind === 'unauthorized', JSON.stringify(mv));
    check('alice\'s VM is still listed for alice', (await (await request('/api/vms', { headers: { cookie: aliceCookie } })).body).includes(aliceVm));
    await bob.context.close();

    const carol = await signedInPage('carol');
    await carol.page.locator('#whoami-name').filter({ hasText: 'admin' }).waitFor({ timeout: 10_000 });
    await carol.page.locator(`#vms li[data-vm="${aliceVm}"]`).waitFor({ timeout: 10_000 });
    check('carol (admin group) sees alice\'s VM', true);
    await carol.context.close();
  });

  await section('a trusted proxy header counts only from the proxy', async () => {
    const viaProxy = JSON.parse((await request('/api/me', { headers: { 'x-remote-user': 'bob' }, localAddress: '127.0.0.2' })).body);
    check('from the proxy address the header signs bob in', viaProxy.signed_in && viaProxy.user === 'bob', JSON.stringify(viaProxy));
    const spoofed = JSON.parse((await request('/api/me', { headers: { 'x-remote-user': 'carol' } })).body);
    check('from anywhere else the header is ignored', spoofed.signed_in === false, JSON.stringify(spoofed));
    const outsider = await request('/api/vms', { headers: { 'x-remote-user': 'dave' }, localAddress: '127.0.0.2' });
    check('a proxied non-member is refused', outsider.status === 401 && /not a member/.test(outsider.body), `${outsider.status} ${outsider.body}`);
    const ws = await rawSocket({ headers: { 'X-Remote-User': 'bob' }, localAddress: '127.0.0.2', send: { op: 'deprovision', vm: aliceVm } });
    const r = await ws.replies(30_000);
    check('a proxied bob cannot delete alice\'s VM either', r.length === 1 && r[0].error && r[0].error.kind === 'unauthorized', JSON.stringify(r));
    ws.close();
  });

  await section('200 idle websockets and 20 stalled readers leave the server responsive', async () => {
    const before = rssKiB();
    const idle = [];
    for (let i = 0; i < 200; i += 1) idle.push(await rawSocket({ cookie: aliceCookie }));
    check('200 idle websockets are open', idle.filter((s) => s.status === 101 && !s.isClosed()).length === 200);
    // Stalled readers: each starts a run (carol, an admin, provisioning for dave: it streams
    // and fails at the user step) and never reads a byte of it.
    const carolLogin = await request('/api/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user: 'carol', password }) });
    const carolCookie = (carolLogin.headers['set-cookie'] || [''])[0].split(';')[0];
    const stalled = [];
    for (let i = 0; i < 20; i += 1) {
      const s = await rawSocket({ cookie: carolCookie, send: { op: 'provision', user: 'dave' } });
      s.stall();
      stalled.push(s);
    }
    check('20 stalled readers are connected', stalled.filter((s) => s.status === 101).length === 20);
    // A new tab still deploys.
    const tab = await alice.context.newPage();
    await tab.goto(url.href);
    await tab.locator('#whoami-name').filter({ hasText: 'alice' }).waitFor({ timeout: 30_000 });
    const t0 = Date.now();
    await tab.click('#deploy');
    const card = tab.locator('.run').first();
    await card.waitFor();
    await finish(card);
    check('a new tab still deploys', (await card.getAttribute('data-state')) === 'done', await card.locator('.end').textContent());
    console.log(`   deploy with 220 other connections open: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const vm = await card.getAttribute('data-vm');
    if (vm) vms.push(vm);
    // Past the connection cap a connection gets a clear message, not a hang. The server
    // says how many are open; fill it up to the cap, then one more.
    const status = JSON.parse((await request('/api/status', { headers: { cookie: carolCookie } })).body);
    console.log(`   server status: ${JSON.stringify(status)}`);
    check('the admin status counts the idle websockets', status.connections >= 200 && status.connections <= status.max_connections, JSON.stringify(status));
    const extra = [];
    for (let i = status.connections; i < status.max_connections; i += 1) extra.push(await rawSocket({ cookie: aliceCookie }));
    const full = JSON.parse((await request('/api/status', { headers: { cookie: carolCookie } })).body);
    check('up to the cap every connection is taken', full.connections === full.max_connections && extra.every((s) => !s.isClosed()), JSON.stringify(full));
    const over = await rawSocket({ cookie: aliceCookie });
    const answer = await over.replies(60_000);
    check('one past the cap is told so and closed', over.isClosed() && answer.length === 1 && answer[0].error && answer[0].error.kind === 'exhausted' && /connections open/.test(answer[0].error.message), JSON.stringify(answer));
    extra.push(over);
    const notAdmin = await request('/api/status', { headers: { cookie: aliceCookie } });
    check('the status is for admins only', notAdmin.status === 401, `${notAdmin.status}`);
    const after = rssKiB();
    console.log(`   server memory: ${before} KiB before, ${after} KiB with 200 idle + 20 stalled`);
    check('server memory stays bounded (< 64 MiB more)', after - before < 64 * 1024, `${before} -> ${after} KiB`);
    for (const s of [...idle, ...stalled, ...extra]) s.close();
    await tab.close();
  });
} finally {
  // Whatever is left is removed through the server, as carol (admin).
  try {
    const login = await request('/api/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user: 'carol', password }) });
    const cookie = (login.headers['set-cookie'] || [''])[0].split(';')[0];
    for (const name of vms) {
      const s = await rawSocket({ cookie, send: { op: 'deprovision', vm: name } });
      const r = await s.replies(RUN_LIMIT);
      check(`cleanup: ${name} removed`, r.some((m) => m.type === 'done'), JSON.stringify(r.slice(-1)));
    }
  } catch (e) {
    check('cleanup', false, String(e));
  }
  await browser.close();
  if (opts.results) writeFileSync(opts.results, JSON.stringify({ passed, failed }));
  console.log(`sign-in: ${passed} passed, ${failed} failed`);
}
process.exit(failed === 0 ? 0 : 1);
