// Browser test of the devvm web page (examples/web.rs), in real headless Chromium.
//
//   node tests/web/test.mjs --url http://127.0.0.1:PORT/ --results FILE --screenshot PNG
//
// Run by scripts/test-web inside the lab's network namespace (the DEVVM_LAB_* environment
// gives the DNS server and libvirt URI for the independent checks). Prints one line per
// check, writes {"passed","failed"} to --results, exits non-zero if any check failed.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { Resolver } from 'node:dns/promises';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

const opts = {};
for (let i = 2; i < process.argv.length; i += 2) opts[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const url = opts.url;
if (!url) {
  console.error('usage: test.mjs --url URL [--results FILE] [--screenshot PNG]');
  process.exit(2);
}
const screenshot = opts.screenshot || 'target/web/screenshot.png';
const RUN_LIMIT = 180_000; // a provision under TCG takes 5-10 s; this is the give-up point
const HOSTILE = '<img src=x onerror=alert(1)>';

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

// Independent checks, asked of the lab's services rather than of the page.
const resolver = new Resolver({ timeout: 2000, tries: 2 });
if (process.env.DEVVM_LAB_DNS_SERVER) {
  resolver.setServers([`${process.env.DEVVM_LAB_DNS_SERVER}:${process.env.DEVVM_LAB_DNS_PORT || 53}`]);
}
async function dnsA(name) {
  try { return await resolver.resolve4(name); } catch { return []; }
}
async function dnsPtr(ip) {
  try { return await resolver.reverse(ip); } catch { return []; }
}
// The lab hosts (DEVVM_LAB_HOST_URIS) where the domain is defined; null outside the lab.
function domainHosts(name) {
  const uris = (process.env.DEVVM_LAB_HOST_URIS || process.env.DEVVM_LAB_LIBVIRT_URI || '')
    .split(/\s+/).filter(Boolean);
  if (uris.length === 0) return null;
  return uris.filter((uri) => {
    try {
      execFileSync('virsh', ['-c', uri, 'dominfo', name], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  });
}

// Whether any lab host (DEVVM_LAB_HOST_URIS; placement may choose any) has the domain.
function domainExists(name) {
  const uris = (process.env.DEVVM_LAB_HOST_URIS || process.env.DEVVM_LAB_LIBVIRT_URI || '')
    .split(/\s+/).filter(Boolean);
  if (uris.length === 0) return null;
  return uris.some((uri) => {
    try {
      execFileSync('virsh', ['-c', uri, 'dominfo', name], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  });
}

const userDataDir = mkdtempSync(join(tmpdir(), 'devvm-web-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
  ],
  viewport: { width: 1280, height: 1000 },
});

const dialogs = [];
const pageErrors = [];
async function newPage() {
  const page = await context.newPage();
  page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(url);
  await page.locator('#vms-status').filter({ hasText: /VM/ }).waitFor({ timeout: 10_000 });
  return page;
}

// Presses Deploy for `user`; returns the run's card (the newest, on top).
async function deploy(page, user) {
  await page.fill('#user', user);
  const before = await page.locator('.run').count();
  await page.click('#deploy');
  await page.locator('.run').nth(before).waitFor();
  return page.locator('.run').first();
}

// Waits for a run card to end; samples its log meanwhile. Returns the distinct line counts seen.
async function finish(card) {
  const counts = new Set();
  const t = Date.now();
  while (Date.now() - t < RUN_LIMIT) {
    counts.add(await card.locator('.log .line').count());
    if ((await card.getAttribute('data-state')) !== 'running') break;
    await sleep(50);
  }
  return counts;
}

async function deleteFromList(page, vm) {
  const item = page.locator(`#vms li[data-vm="${vm}"]`);
  await item.waitFor({ timeout: 10_000 });
  const button = item.locator('button.delete');
  await button.click(); // arms
  await button.click(); // confirms
  const card = page.locator(`.run[data-op="deprovision"][data-vm="${vm}"]`);
  await card.waitFor({ timeout: 10_000 });
  return card;
}

// One command over a raw websocket from the page; every reply until the server closes.
async function wsCommand(page, command) {
  return page.evaluate((command) => new Promise((resolve) => {
    const ws = new WebSocket(`ws://${location.host}/ws`);
    const replies = [];
    ws.onopen = () => ws.send(command);
    ws.onmessage = (m) => replies.push(JSON.parse(m.data));
    ws.onclose = () => resolve(replies);
  }), typeof command === 'string' ? command : JSON.stringify(command));
}

const timings = {};
let page;

try {
  await section('provision alice, watch the steps arrive, then delete her VM', async () => {
    page = await newPage();
    const t0 = Date.now();
    const card = await deploy(page, 'alice');
    await card.locator('.step[data-step="user"][data-state="done"]').waitFor({ timeout: 30_000 });
    check('a step is done while the run still goes on', (await card.getAttribute('data-state')) === 'running');
    const counts = await finish(card);
    timings.provision = (Date.now() - t0) / 1000;
    check('the run ends in success', (await card.getAttribute('data-state')) === 'done',
      await card.locator('.end').textContent());
    check('the log grew line by line (≥ 4 distinct lengths seen while running)', counts.size >= 4, [...counts].join(','));
    const states = await card.locator('.step').evaluateAll((rows) => rows.map((r) => `${r.dataset.step}=${r.dataset.state}`));
    check('every step shows ✓ done', states.length === 8 && states.every((s) => s.endsWith('=done')), states.join(' '));
    const log = await card.locator('.log').innerText();
    for (const step of ['user', 'placement', 'ip', 'dns', 'image', 'disk', 'domain', 'bootstrap']) {
      if (!new RegExp(`${step}\\s+✓`).test(log)) check(`log has "${step} ✓"`, false, log);
    }
    check('log has started and ✓ finished lines per step', /user\s+started/.test(log) && /domain\s+✓/.test(log));
    const vm = await card.getAttribute('data-vm');
    const fqdn = (await card.locator('.end .fqdn').textContent()).trim();
    const ip = (await card.locator('.end .ip').textContent()).trim();
    check('the end shows the VM\'s fqdn and address', /^alice-[0-9a-f]{6}\./.test(fqdn) && fqdn.startsWith(vm + '.') && /^\d+\.\d+\.\d+\.\d+$/.test(ip), `${fqdn} ${ip}`);
    mkdirSync(dirname(screenshot), { recursive: true });
    await page.locator('#vms li[data-vm="' + vm + '"]').waitFor({ timeout: 10_000 });
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(`   screenshot: ${screenshot}`);
    console.log(`   ${vm}: ${fqdn} at ${ip}, ready in ${timings.provision.toFixed(1)} s`);
    if (process.env.DEVVM_LAB_DNS_SERVER) {
      check('the fqdn resolves to the address (asked of BIND)', JSON.stringify(await dnsA(fqdn)) === JSON.stringify([ip]));
      check('the address has the PTR record', (await dnsPtr(ip)).map((n) => n.replace(/\.$/, '')).includes(fqdn));
    }
    if (domainExists(vm) !== null) check('libvirt runs the domain', domainExists(vm) === true);
    check('the list shows the VM', await page.locator(`#vms li[data-vm="${vm}"]`).isVisible());

    // With a second host the list offers a live move; the VM keeps its address.
    const item = page.locator(`#vms li[data-vm="${vm}"]`);
    if (await item.locator('button.migrate').count() > 0) {
      const from = await item.getAttribute('data-host');
      const to = await item.locator('select.move-to').inputValue();
      await item.locator('button.migrate').click();
      const move = page.locator(`.run[data-op="migrate"][data-vm="${vm}"]`);
      await move.waitFor({ timeout: 10_000 });
      await finish(move);
      check('the move ends in success', (await move.getAttribute('data-state')) === 'done',
        await move.locator('.end').textContent());
      check('the move streams its domain step', await move.locator('.step[data-step="domain"][data-state="done"]').count() === 1);
      check('the moved VM keeps its address', (await move.locator('.end .ip').textContent()).trim() === ip);
      await page.locator(`#vms li[data-vm="${vm}"][data-host="${to}"]`).waitFor({ timeout: 10_000 });
      check('the list shows the VM on the other host', from !== to);
      if (domainHosts(vm) !== null) check('libvirt runs it on that host only', JSON.stringify(domainHosts(vm)) === JSON.stringify([to]));
    }

    const t1 = Date.now();
    const teardown = await deleteFromList(page, vm);
    const tcounts = await finish(teardown);
    timings.deprovision = (Date.now() - t1) / 1000;
    check('the teardown ends in success', (await teardown.getAttribute('data-state')) === 'done',
      await teardown.locator('.end').textContent());
    const undone = await teardown.locator('.log .line[data-kind="undone"]').count();
    check('the teardown streams ↶ undone lines (≥ 6)', undone >= 6, `${undone} lines, lengths ${[...tcounts].join(',')}`);
    check('the teardown names the VM removed', (await teardown.locator('.end .removed').textContent()).includes(vm));
    await page.locator(`#vms li[data-vm="${vm}"]`).waitFor({ state: 'detached', timeout: 10_000 });
    check('the list no longer shows the VM', true);
    if (process.env.DEVVM_LAB_DNS_SERVER) check('the A record is gone from BIND', (await dnsA(fqdn)).length === 0);
    if (domainExists(vm) !== null) check('the libvirt domain is gone', domainExists(vm) === false);
  });

  await section('two tabs provision at once (alice and bob) without mixing their streams', async () => {
    const [pa, pb] = [await newPage(), await newPage()];
    const t0 = Date.now();
    const [ca, cb] = await Promise.all([deploy(pa, 'alice'), deploy(pb, 'bob')]);
    await Promise.all([
      ca.locator('.vm-name').filter({ hasText: /./ }).waitFor(),
      cb.locator('.vm-name').filter({ hasText: /./ }).waitFor(),
    ]);
    const both = [await ca.getAttribute('data-state'), await cb.getAttribute('data-state')];
    check('both runs are under way at the same time', both[0] === 'running' && both[1] === 'running', both.join(','));
    await Promise.all([finish(ca), finish(cb)]);
    timings.concurrent = (Date.now() - t0) / 1000;
    check('both runs end in success', (await ca.getAttribute('data-state')) === 'done' && (await cb.getAttribute('data-state')) === 'done');
    const [va, vb] = [await ca.getAttribute('data-vm'), await cb.getAttribute('data-vm')];
    const [ra, rb] = [await ca.getAttribute('data-request-id'), await cb.getAttribute('data-request-id')];
    check('each tab got its own VM', va.startsWith('alice-') && vb.startsWith('bob-'), `${va} ${vb}`);
    const [ta, tb] = [await pa.locator('#runs').innerText(), await pb.locator('#runs').innerText()];
    check('alice\'s tab shows none of bob\'s VM or events', !ta.includes(vb) && !ta.includes('bob'), ta.slice(0, 400));
    check('bob\'s tab shows none of alice\'s VM or events', !tb.includes(va) && !tb.includes('alice'), tb.slice(0, 400));
    check('each tab\'s log has its own run and only that', ta.includes(`provision of ${va} started`) && tb.includes(`provision of ${vb} started`)
      && (ta.match(/provision of .* started/g) || []).length === 1 && (tb.match(/provision of .* started/g) || []).length === 1);
    check('the request ids differ', ra && rb && ra !== rb);
    // Both tear down at once, each from its own tab.
    const [da, db] = await Promise.all([deleteFromList(pa, va), deleteFromList(pb, vb)]);
    await Promise.all([finish(da), finish(db)]);
    check('both teardowns end in success', (await da.getAttribute('data-state')) === 'done' && (await db.getAttribute('data-state')) === 'done');
    const [xa, xb] = [await da.locator('.log').innerText(), await db.locator('.log').innerText()];
    check('each teardown stream is its own', xa.includes(va) && !xa.includes(vb) && xb.includes(vb) && !xb.includes(va));
    await pa.close();
    await pb.close();
  });

  await section('failures: a hostile user name, a user not allowed, bad commands', async () => {
    const card = await deploy(page, HOSTILE);
    await finish(card);
    check('the hostile name ends in an error', (await card.getAttribute('data-state')) === 'failed');
    check('the error is invalid_input', (await card.locator('.end .kind').textContent()) === 'invalid_input');
    const message = await card.locator('.end .message').first().textContent();
    check('the error shows the name as text', message.includes(HOSTILE), message);
    check('the title shows the name as text', (await card.locator('.run-title .subject').textContent()) === HOSTILE);
    check('no <img> element was created', (await page.locator('img').count()) === 0);
    // A script smuggled in through the name would have run while the card rendered, and an
    // alert() blocks the page until the dialog handler dismisses it: a round trip through the
    // page's JS thread therefore comes back only after any such dialog was reported.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => r(true))));
    check('no script ran (no dialog)', dialogs.length === 0, dialogs.join('; '));

    const dave = await deploy(page, 'dave');
    await finish(dave);
    check('a user outside the owners\' group fails', (await dave.getAttribute('data-state')) === 'failed');
    check('... at the user step, shown ✗', (await dave.locator('.step[data-step="user"]').getAttribute('data-state')) === 'failed');
    check('... as unauthorized', (await dave.locator('.end .kind').textContent()) === 'unauthorized',
      await dave.locator('.end').textContent());

    const bad = await wsCommand(page, { op: 'deprovision', vm: '../etc/passwd' });
    check('a bad VM name is a JSON invalid_input error', bad.length === 1 && bad[0].type === 'error' && bad[0].error.kind === 'invalid_input', JSON.stringify(bad));
    const unknown = await wsCommand(page, { op: 'deprovision', vm: 'no-such-vm' });
    check('an unknown VM is not_found', unknown.some((m) => m.type === 'error' && m.error.kind === 'not_found'), JSON.stringify(unknown));
    const junk = await wsCommand(page, 'not json {');
    check('a malformed command is an invalid_input error', junk.length === 1 && junk[0].error && junk[0].error.kind === 'invalid_input', JSON.stringify(junk));
    const raw = await wsCommand(page, { op: 'provision', user: HOSTILE });
    check('the raw hostile provision is one error, nothing started', raw.length === 1 && raw[0].type === 'error', JSON.stringify(raw));
    const list = await page.evaluate(async () => (await fetch('/api/vms')).status);
    check('the server still serves after all that', list === 200);
    check('no script errors on the page', pageErrors.length === 0, pageErrors.join('; '));
    const failures = join(dirname(screenshot), 'failures.png');
    await page.screenshot({ path: failures, fullPage: true });
    console.log(`   screenshot: ${failures}`);
  });
} finally {
  // Whatever a failed check left behind is removed through the server itself.
  try {
    const p = page || (await newPage());
    const left = await p.evaluate(async () => (await (await fetch('/api/vms')).json()).map((v) => v.name));
    for (const name of left) {
      const r = await wsCommand(p, { op: 'deprovision', vm: name });
      console.log(`   cleanup: removed ${name}: ${r.some((m) => m.type === 'done')}`);
    }
    check('no VM is left in the list', left.length === 0, left.join(' '));
  } catch (e) {
    check('cleanup', false, String(e));
  }
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  const t = Object.entries(timings).map(([k, v]) => `${k} ${v.toFixed(1)} s`).join(', ');
  console.log(`timings: ${t}`);
  if (opts.results) writeFileSync(opts.results, JSON.stringify({ passed, failed, timings }));
  console.log(`browser: ${passed} passed, ${failed} failed`);
}
process.exit(failed === 0 ? 0 : 1);
