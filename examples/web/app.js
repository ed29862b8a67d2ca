// devvm web page. Every piece of data (user names, VM names, messages, errors) goes into
// the page through textContent: this file never assigns HTML.
'use strict';

const STEPS = ['user', 'placement', 'ip', 'dns', 'image', 'disk', 'domain', 'bootstrap'];
const LABELS = {
  user: 'user', placement: 'placement', ip: 'ip lease', dns: 'dns A+PTR',
  image: 'template', disk: 'disk', domain: 'vm', bootstrap: 'bootstrap',
};
const ICONS = {
  pending: '·', running: '◌', done: '✓', failed: '✗', undone: '↶', undo_failed: '⚠',
};

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function seconds(ms) {
  return (ms / 1000).toFixed(1) + ' s';
}

// One run (a provision or a deprovision) over its own websocket.
class Run {
  constructor(operation, subject) {
    this.operation = operation;
    this.t0 = null; // time of the run's first event, from the server's clock
    this.started = performance.now();
    this.finished = false;
    this.rows = new Map();

    const card = el('section', 'card run');
    card.dataset.op = operation;
    card.dataset.state = 'running';
    const head = el('div', 'run-head');
    this.icon = el('span', 'run-icon', ICONS.running);
    const title = el('h2', 'run-title');
    const titles = { provision: 'Deploying a VM for ', deprovision: 'Removing ', migrate: 'Moving ' };
    this.titleText = document.createTextNode(titles[operation] || operation + ' ');
    title.append(this.titleText, el('span', 'subject', subject));
    this.vmName = el('span', 'vm-name');
    this.elapsed = el('span', 'elapsed', '0.0 s');
    this.cancelButton = el('button', 'quiet cancel', 'Cancel');
    this.cancelButton.type = 'button';
    this.cancelButton.hidden = true;
    this.cancelButton.addEventListener('click', () => this.cancel());
    head.append(this.icon, title, this.vmName, this.elapsed, this.cancelButton);

    this.steps = el('ol', 'steps');
    if (operation === 'provision') {
      for (const step of STEPS) this.row(step);
    }
    const details = el('details', 'log-box');
    details.open = true;
    details.append(el('summary', null, 'log'));
    this.log = el('div', 'log');
    details.append(this.log);
    this.end = el('div', 'end');
    this.end.hidden = true;
    card.append(head, this.steps, details, this.end);
    this.card = card;
    document.getElementById('runs').prepend(card);

    this.timer = setInterval(() => {
      this.elapsed.textContent = seconds(performance.now() - this.started);
    }, 100);
  }

  open(command) {
    this.socket = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
    this.socket.addEventListener('open', () => this.socket.send(JSON.stringify(command)));
    this.socket.addEventListener('message', (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      this.handle(msg);
    });
    this.socket.addEventListener('close', () => {
      if (!this.finished) {
        this.fail({
          kind: 'disconnected',
          message: 'the connection to the server was lost; the run goes on there, and the list shows its VM when it ends',
        });
      }
    });
    return this;
  }

  cancel() {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ op: 'cancel' }));
      this.cancelButton.disabled = true;
      this.cancelButton.textContent = 'Cancelling…';
    }
  }

  row(step) {
    let r = this.rows.get(step);
    if (r) return r;
    const li = el('li', 'step');
    li.dataset.step = step;
    li.dataset.state = 'pending';
    const icon = el('span', 'icon', ICONS.pending);
    const name = el('span', 'name', LABELS[step] || step);
    const detail = el('span', 'detail');
    const bar = el('span', 'bar');
    bar.hidden = true;
    const fill = el('span', 'fill');
    bar.append(fill);
    const time = el('span', 'time');
    li.append(icon, name, detail, bar, time);
    this.steps.append(li);
    r = { li, icon, detail, bar, fill, time };
    this.rows.set(step, r);
    return r;
  }

  setStep(step, state, detail, at) {
    const r = this.row(step);
    r.li.dataset.state = state;
    r.icon.textContent = ICONS[state] || '·';
    if (detail !== undefined) r.detail.textContent = detail;
    if (state === 'running' && r.started === undefined) r.started = at;
    if (state !== 'running') r.bar.hidden = true;
    if ((state === 'done' || state === 'failed') && r.started !== undefined) {
      r.time.textContent = seconds(at - r.started);
    }
  }

  line(at, step, icon, text, kind) {
    const d = el('div', 'line');
    d.dataset.kind = kind;
    const rel = this.t0 === null ? 0 : at - this.t0;
    d.append(
      el('span', 't', (rel / 1000).toFixed(2).padStart(6) + 's'),
      el('span', 's', (step || '').padEnd(9)),
      el('span', 'i', icon),
      el('span', 'm', text),
    );
    this.log.append(d);
    this.log.scrollTop = this.log.scrollHeight;
  }

  handle(msg) {
    switch (msg.type) {
      case 'accepted':
        this.vmName.textContent = msg.vm;
        this.card.dataset.vm = msg.vm;
        if (msg.request_id) this.card.dataset.requestId = msg.request_id;
        if (this.operation === 'provision') this.cancelButton.hidden = false;
        break;
      case 'event':
        this.event(msg.event);
        break;
      case 'done':
        this.done(msg);
        break;
      case 'error':
        this.fail(msg.error || { kind: 'error', message: 'unknown error' });
        break;
    }
  }

  event(e) {
    const at = Date.parse(e.at);
    if (this.t0 === null) this.t0 = at;
    switch (e.type) {
      case 'run_started':
        this.line(at, '', '▶', e.operation + ' of ' + e.vm + ' started', 'run');
        break;
      case 'step_started':
        this.setStep(e.step, 'running', 'started', at);
        this.line(at, e.step, ' ', 'started', 'started');
        break;
      case 'step_progress': {
        this.setStep(e.step, 'running', e.message, at);
        const r = this.row(e.step);
        if (typeof e.fraction === 'number') {
          r.bar.hidden = false;
          r.fill.style.width = Math.round(e.fraction * 100) + '%';
        }
        this.line(at, e.step, ' ', e.message, 'progress');
        break;
      }
      case 'step_finished':
        this.setStep(e.step, 'done', e.summary, at);
        this.line(at, e.step, '✓', e.summary, 'finished');
        break;
      case 'step_failed':
        this.setStep(e.step, 'failed', e.error.message, at);
        this.line(at, e.step, '✗', e.error.message, 'failed');
        break;
      case 'step_undone':
        // A failed step keeps its ✗ and its error; a step that had acted shows ↶.
        if (this.row(e.step).li.dataset.state !== 'failed') this.setStep(e.step, 'undone', 'undone', at);
        this.line(at, e.step, '↶', 'undone', 'undone');
        break;
      case 'undo_failed':
        this.setStep(e.failure.step, 'undo_failed', e.failure.resource + ' still held', at);
        this.line(at, e.failure.step, '⚠', 'undo failed: ' + e.failure.resource + ' still held (' + e.failure.error + ')', 'undo_failed');
        break;
      case 'warning':
        this.line(at, '', '⚠', 'warning: ' + e.message, 'warning');
        break;
      case 'left_alone':
        this.line(at, e.step, '↷', 'left alone: ' + e.resource + ' (held by ' + e.holder + ')', 'left_alone');
        break;
      case 'run_finished':
        this.line(at, '', '■', 'finished', 'run');
        break;
      case 'run_failed':
        this.line(at, '', '✗', 'failed: ' + e.error.message, 'run_failed');
        break;
      case 'lagged':
        this.line(at, '', '…', e.missed + ' events not shown (this page fell behind)', 'lagged');
        break;
      default:
        break;
    }
  }

  stop(state) {
    this.finished = true;
    clearInterval(this.timer);
    this.elapsed.textContent = seconds(performance.now() - this.started);
    this.card.dataset.state = state;
    const ended = {
      provision: ['VM ready for ', 'Deploy failed for '],
      deprovision: ['Removed ', 'Removing failed: '],
      migrate: ['Moved ', 'Moving failed (it runs where it was): '],
    }[this.operation] || ['Done: ', 'Failed: '];
    this.titleText.textContent = state === 'done' ? ended[0] : ended[1];
    this.icon.textContent = state === 'done' ? '✓' : '✗';
    this.cancelButton.hidden = true;
    // Steps still waiting will not run now.
    for (const r of this.rows.values()) {
      if (r.li.dataset.state === 'pending') r.li.dataset.state = 'skipped';
    }
    refreshVms();
  }

  done(msg) {
    this.stop('done');
    this.end.hidden = false;
    this.end.className = 'end ok';
    if (msg.vm) {
      const vm = msg.vm;
      const title = el('div', 'end-title');
      title.append(el('span', 'big-icon', '✓'), el('span', 'fqdn', vm.fqdn));
      const facts = el('div', 'facts');
      facts.append(
        el('span', 'ip', vm.ip),
        el('span', 'sep', '·'),
        el('span', 'host', hostLabel(vm.host)),
        el('span', 'sep', '·'),
        el('span', null, (this.operation === 'migrate' ? 'moved in ' : 'ready in ') + this.elapsed.textContent),
      );
      const ssh = el('code', 'ssh', 'ssh root@' + vm.fqdn);
      this.end.append(title, facts, ssh);
    } else {
      const title = el('div', 'end-title');
      title.append(el('span', 'big-icon', '✓'), el('span', 'removed', this.card.dataset.vm + ' removed'));
      this.end.append(title, el('div', 'facts', 'every step undone: VM, disk, DNS records, IP lease, host slot'));
    }
  }

  fail(error) {
    if (this.finished) return;
    this.stop('failed');
    if (this.t0 === null) {
      // Refused before anything ran: the error alone tells the story.
      this.steps.hidden = true;
      this.log.parentElement.hidden = true;
    }
    this.end.hidden = false;
    this.end.className = 'end error';
    const title = el('div', 'end-title');
    title.append(el('span', 'big-icon', '✗'), el('span', 'kind', error.kind || 'error'));
    this.end.append(title, el('div', 'message', error.message || ''));
    for (const f of error.undo_failures || []) {
      this.end.append(el('div', 'message', 'still held: ' + f.resource + ' (' + f.error + ')'));
    }
  }
}

const deleting = new Set();
let hostList = []; // placement hosts, in the config's order (host 1, host 2, ...)

function hostLabel(host) {
  const i = hostList.indexOf(host);
  return i < 0 ? host : 'host ' + (i + 1);
}

function vmItem(vm) {
  const li = el('li', 'vm');
  li.dataset.vm = vm.name;
  li.dataset.host = vm.host;
  const main = el('div', 'vm-main');
  main.append(el('div', 'vm-title', vm.name), el('div', 'vm-fqdn', vm.fqdn));
  const created = new Date(vm.created);
  const host = el('span', 'vm-host', hostLabel(vm.host));
  host.title = vm.host;
  const facts = el('div', 'vm-facts', vm.ip + ' · ' + vm.owner + ' · ' + created.toLocaleTimeString() + ' · ');
  facts.append(host);
  main.append(facts);
  // Move it live to another host (shown only when there is one).
  const others = hostList.filter((h) => h !== vm.host);
  if (others.length > 0) {
    const move = el('div', 'vm-move');
    const select = el('select', 'move-to');
    select.setAttribute('aria-label', 'move ' + vm.name + ' to');
    for (const h of others) {
      const o = el('option', null, hostLabel(h));
      o.value = h;
      select.append(o);
    }
    const go = el('button', 'quiet migrate', 'Move');
    go.type = 'button';
    go.addEventListener('click', () => {
      go.disabled = true;
      go.textContent = 'Moving…';
      const run = new Run('migrate', vm.name);
      run.open({ op: 'migrate', vm: vm.name, to: select.value });
    });
    move.append(select, go);
    main.append(move);
  }
  const del = el('button', 'danger delete', deleting.has(vm.name) ? 'Removing…' : 'Delete');
  del.type = 'button';
  del.disabled = deleting.has(vm.name);
  let armed = null;
  del.addEventListener('click', () => {
    if (!armed) {
      // A second click confirms; it disarms by itself.
      del.textContent = 'Really delete?';
      del.classList.add('armed');
      armed = setTimeout(() => {
        armed = null;
        del.textContent = 'Delete';
        del.classList.remove('armed');
      }, 4000);
      return;
    }
    clearTimeout(armed);
    del.disabled = true;
    del.textContent = 'Removing…';
    deleting.add(vm.name);
    const run = new Run('deprovision', vm.name);
    run.open({ op: 'deprovision', vm: vm.name });
    const stop = run.stop.bind(run);
    run.stop = (state) => { deleting.delete(vm.name); stop(state); };
  });
  li.append(main, del);
  return li;
}

let refreshing = null;

async function loadVms() {
  const list = document.getElementById('vms');
  const status = document.getElementById('vms-status');
  try {
    const hr = await fetch('/api/hosts', { cache: 'no-store' });
    if (hr.ok) hostList = (await hr.json()).map((h) => h.host);
    const r = await fetch('/api/vms', { cache: 'no-store' });
    const body = await r.json();
    if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
    list.replaceChildren(...body.map(vmItem));
    status.textContent = body.length === 0 ? 'No VMs yet.' : body.length + (body.length === 1 ? ' VM' : ' VMs');
    status.classList.remove('bad');
  } catch (e) {
    status.textContent = 'Could not load the list: ' + e.message;
    status.classList.add('bad');
  }
}

function refreshVms() {
  if (!refreshing) refreshing = loadVms().finally(() => { refreshing = null; });
  return refreshing;
}

// Who is signed in, from /api/me: { sign_in: ['ldap'|'proxy'], signed_in, user, admin }.
let me = { sign_in: [], signed_in: true, user: null, admin: true };

function showSignedIn() {
  const signedIn = me.signed_in;
  document.getElementById('login').hidden = signedIn;
  document.getElementById('main').hidden = !signedIn;
  const who = document.getElementById('whoami');
  who.hidden = !(signedIn && me.user);
  document.getElementById('whoami-name').textContent =
    me.user ? 'signed in as ' + me.user + (me.admin ? ' (admin)' : '') : '';
  document.getElementById('sign-out').hidden = !me.sign_in.includes('ldap');
  const input = document.getElementById('user');
  if (me.user && !me.admin) {
    // Only for yourself: the field shows who the VM is for.
    input.value = me.user;
    input.readOnly = true;
  } else {
    input.readOnly = false;
  }
}

async function loadMe() {
  try {
    const r = await fetch('/api/me', { cache: 'no-store' });
    if (r.ok) me = await r.json();
  } catch {
    // Keep the defaults; the list will say what is wrong.
  }
  showSignedIn();
  if (me.signed_in) refreshVms();
}

async function signIn(ev) {
  ev.preventDefault();
  const error = document.getElementById('login-error');
  const button = document.getElementById('login-submit');
  error.textContent = '';
  button.disabled = true;
  try {
    const r = await fetch('/api/login', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        user: document.getElementById('login-user').value.trim(),
        password: document.getElementById('login-password').value,
      }),
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      error.textContent = (body.error && body.error.message) || ('sign-in failed: ' + r.status);
      return;
    }
    document.getElementById('login-password').value = '';
    await loadMe();
  } catch (e) {
    error.textContent = 'sign-in failed: ' + e.message;
  } finally {
    button.disabled = false;
  }
}

async function signOut() {
  await fetch('/api/logout', { method: 'POST' }).catch(() => {});
  document.getElementById('vms').replaceChildren();
  await loadMe();
}

document.addEventListener('DOMContentLoaded', () => {
  const form = document.getElementById('deploy-form');
  const input = document.getElementById('user');
  document.getElementById('login-form').addEventListener('submit', signIn);
  document.getElementById('sign-out').addEventListener('click', signOut);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const user = input.value.trim();
    new Run('provision', user).open(user ? { op: 'provision', user } : { op: 'provision' });
  });
  document.getElementById('refresh').addEventListener('click', refreshVms);
  input.focus();
  loadMe();
});
