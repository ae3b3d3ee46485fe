// Davit dashboard: fills the server-rendered pages from the REST API (/api/v1) with the
// session cookie and keeps them live (Server-Sent Events where the API streams, polling
// elsewhere). Every value goes into the page as text (textContent), never as markup. Writes
// carry the page's CSRF token in X-CSRF-Token. No framework, no build step.
(function () {
  'use strict';

  const main = document.getElementById('main');
  if (!main || !main.dataset.page) return;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : '';
  const page = main.dataset.page;

  // ---------- helpers ----------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attributes, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  function replaceChildren(node, children) {
    node.replaceChildren(...children.filter((child) => child !== null && child !== undefined));
  }

  class ApiFailure extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, method, body) {
    const headers = { accept: 'application/json' };
    const options = { method: method || 'GET', headers, credentials: 'same-origin' };
    if (options.method !== 'GET') {
      headers['x-csrf-token'] = csrf;
      headers['content-type'] = 'application/json';
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, options);
    if (response.status === 401) {
      window.location.assign('/login?next=' + encodeURIComponent(window.location.pathname + window.location.search));
      throw new ApiFailure(401, 'your session ended; log in again');
    }
    let json = null;
    try {
      json = await response.json();
    } catch (ignored) {
      json = null;
    }
    if (!response.ok) {
      const message = json && json.error ? json.error.message : response.status + ' ' + response.statusText;
      throw new ApiFailure(response.status, message);
    }
    return json;
  }

  // Every page of a paged list (`items` + `next_cursor`), up to `maxPages` of 500.
  async function all(path, maxPages) {
    const items = [];
    let cursor = null;
    for (let pages = 0; pages < (maxPages || 20); pages++) {
      const separator = path.includes('?') ? '&' : '?';
      const reply = await api(path + separator + 'limit=500' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : ''));
      items.push(...(reply.items || []));
      cursor = reply.next_cursor;
      if (!cursor) break;
    }
    return items;
  }

  const liveStatus = document.getElementById('live-status');
  function setLive(text, failed) {
    if (!liveStatus) return;
    liveStatus.textContent = text;
    liveStatus.classList.toggle('error', Boolean(failed));
  }

  // Run `work` now and then every `ms` (skipped while the tab is hidden); failures are shown.
  function every(ms, work) {
    let timer = null;
    async function tick() {
      if (!document.hidden) {
        try {
          await work();
          setLive('Live · updated ' + new Date().toLocaleTimeString());
        } catch (error) {
          setLive('Could not refresh: ' + error.message, true);
        }
      }
      timer = window.setTimeout(tick, ms);
    }
    tick();
    return () => window.clearTimeout(timer);
  }

  function formatTime(iso) {
    if (!iso) return '—';
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    return date.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function timeCell(iso) {
    return el('time', { datetime: iso || '' }, formatTime(iso));
  }

  function formatDuration(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
    const seconds = Math.max(0, Math.round(ms / 1000));
    if (seconds < 60) return seconds + ' s';
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + ' min ' + String(seconds % 60).padStart(2, '0') + ' s';
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + ' h ' + String(minutes % 60).padStart(2, '0') + ' min';
    return Math.floor(hours / 24) + ' d ' + (hours % 24) + ' h';
  }

  function between(start, end) {
    if (!start) return null;
    const from = Date.parse(start);
    const to = end ? Date.parse(end) : Date.now();
    return Number.isNaN(from) || Number.isNaN(to) ? null : to - from;
  }

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit++;
    }
    return (unit === 0 ? value : value.toFixed(1)) + ' ' + units[unit];
  }

  function short(text, length) {
    if (!text) return '—';
    return text.length > (length || 10) ? text.slice(0, length || 10) : text;
  }

  const STATUS_LABELS = {
    success: 'Success', failure: 'Failure', pending: 'Pending', running: 'Running', cancelled: 'Cancelled',
    rolled_back: 'Rolled back', none: 'No runs', online: 'Online', offline: 'Offline', draining: 'Draining', lost: 'Lost',
    queued: 'Queued', succeeded: 'Succeeded', failed: 'Failed', skipped: 'Skipped', healthy: 'Healthy', absent: 'Absent',
    stopped: 'Stopped', leader: 'Leader', follower: 'Follower', learner: 'Learner', in_sync: 'In sync',
    catching_up: 'Catching up', behind: 'Behind', unknown: 'Unknown', assigned: 'Assigned', infrastructure: 'Infrastructure',
  };

  // What a run's status is called on the dashboard (the API says failed for a cancelled run,
  // with a reason that starts "cancelled by").
  function runStatus(deployment) {
    switch (deployment.status) {
      case 'success': return 'success';
      case 'in_progress': return 'running';
      case 'pending': return 'pending';
      case 'rolled_back': return 'rolled_back';
      case 'failed': return /^cancelled/.test(deployment.status_reason || '') ? 'cancelled' : 'failure';
      default: return deployment.status;
    }
  }

  function badge(status) {
    const key = String(status || 'unknown').toLowerCase();
    const label = STATUS_LABELS[key] || (key.charAt(0).toUpperCase() + key.slice(1)).replace(/_/g, ' ');
    return el('span', { class: 'badge status-' + key.replace(/[^a-z_]/g, '') }, label);
  }

  function isFinal(deployment) {
    return ['success', 'failed', 'rolled_back'].includes(deployment.status);
  }

  function branchOf(deployment, pipeline) {
    if (deployment.branch) return deployment.branch;
    if (deployment.scm && deployment.scm.git_ref) return deployment.scm.git_ref.replace(/^refs\/(heads|tags)\//, '');
    return (pipeline && pipeline.branch) || '';
  }

  function link(href, text) {
    return el('a', { href }, text);
  }

  function row(cells, attributes) {
    return el('tr', attributes || {}, cells.map((cell, index) => {
      const header = cell && cell.header;
      const content = header ? cell.content : cell;
      return el(header ? 'th' : 'td', header ? { scope: 'row' } : {}, content === null || content === undefined ? '—' : content);
    }));
  }

  // Label each cell with its column's heading, for the stacked layout on narrow screens.
  function labelCells(table) {
    const headings = Array.from(table.querySelectorAll('thead th')).map((th) => th.textContent);
    for (const tr of table.querySelectorAll('tbody tr')) {
      Array.from(tr.children).forEach((cell, index) => {
        if (headings[index]) cell.setAttribute('data-label', headings[index]);
      });
    }
  }

  function fillTable(table, rows) {
    replaceChildren(table.tBodies[0], rows);
    labelCells(table);
  }

  function onInput(id, handler) {
    const control = document.getElementById(id);
    if (control) control.addEventListener('input', handler);
    return control;
  }

  // ---------- pages ----------

  const pages = {};

  pages.pipelines = function () {
    const table = document.getElementById('pipelines');
    const text = onInput('filter-text', render);
    const status = document.getElementById('filter-status');
    status.addEventListener('change', render);
    let rows = [];

    function render() {
      const needle = text.value.trim().toLowerCase();
      const wanted = status.value;
      const shown = rows.filter((entry) => (!wanted || entry.status === wanted) && (!needle || entry.haystack.includes(needle)));
      fillTable(table, shown.map((entry) => entry.tr));
      document.getElementById('pipelines-empty').hidden = shown.length > 0;
    }

    return every(3000, async () => {
      const [pipelines, deployments] = await Promise.all([all('/api/v1/pipelines'), all('/api/v1/deployments')]);
      const latest = new Map();
      const byId = new Map(pipelines.map((pipeline) => [pipeline.pipeline_id, pipeline]));
      for (const deployment of deployments) {
        const branch = branchOf(deployment, byId.get(deployment.pipeline_id));
        latest.set(deployment.pipeline_id + '\u0000' + branch, { deployment, branch });
      }
      const entries = [];
      for (const pipeline of pipelines) {
        const runs = Array.from(latest.values()).filter((entry) => entry.deployment.pipeline_id === pipeline.pipeline_id);
        if (runs.length === 0) runs.push({ deployment: null, branch: pipeline.branch || '' });
        for (const { deployment, branch } of runs) {
          const state = deployment ? runStatus(deployment) : 'none';
          const name = el('span', {}, pipeline.name, pipeline.is_active ? null : el('span', { class: 'muted' }, ' (inactive)'));
          const tr = row([
            { header: true, content: name },
            branch || '—',
            badge(state),
            deployment ? link('/runs/' + deployment.deployment_id, '#' + deployment.deployment_id) : '—',
            deployment ? el('code', { title: deployment.commit_hash }, short(deployment.commit_hash, 10)) : '—',
            deployment ? link('/deployments/' + deployment.deployment_id, deployment.environment) : pipeline.environment,
            deployment ? timeCell(deployment.start_time || deployment.created_at) : '—',
            deployment ? formatDuration(between(deployment.start_time || deployment.created_at, deployment.end_time)) : '—',
          ], { 'data-status': state, 'data-pipeline': pipeline.name, 'data-branch': branch });
          entries.push({
            tr, status: state, created: deployment ? deployment.deployment_id : 0,
            haystack: [pipeline.name, branch, deployment ? deployment.commit_hash : '', deployment ? deployment.environment : ''].join(' ').toLowerCase(),
          });
        }
      }
      entries.sort((a, b) => b.created - a.created);
      rows = entries;
      render();
    });
  };

  pages.run = function () {
    const deploymentId = main.dataset.deploymentId;
    const pipelineId = main.dataset.pipelineId;
    const summary = document.getElementById('summary');
    const jobsBox = document.getElementById('jobs');
    const log = document.getElementById('log');
    const search = onInput('log-search', filterLog);
    const level = document.getElementById('log-level');
    level.addEventListener('change', filterLog);
    const count = document.getElementById('log-count');
    let deployment = null;
    let ended = false;
    let artifactsLoaded = false;
    let total = 0;

    function summaryItems(list, items) {
      replaceChildren(list, items.flatMap(([term, value]) => [el('dt', {}, term), el('dd', {}, value === null || value === undefined || value === '' ? '—' : value)]));
    }

    async function refresh() {
      const [current, jobs] = await Promise.all([
        api('/api/v1/deployments/' + deploymentId),
        api('/api/v1/deployments/' + deploymentId + '/jobs'),
      ]);
      deployment = current;
      const pipeline = await api('/api/v1/pipelines/' + current.pipeline_id).catch(() => null);
      summaryItems(summary, [
        ['Status', badge(runStatus(current))],
        ['Pipeline', pipeline ? pipeline.name : '#' + current.pipeline_id],
        ['Branch', branchOf(current, pipeline)],
        ['Commit', el('code', {}, current.commit_hash)],
        ['Environment', link('/deployments/' + current.deployment_id, current.environment)],
        ['Started', timeCell(current.start_time || current.created_at)],
        ['Ended', current.end_time ? timeCell(current.end_time) : 'still running'],
        ['Duration', formatDuration(between(current.start_time || current.created_at, current.end_time))],
        ['Reason', current.status_reason],
      ]);
      replaceChildren(jobsBox, (jobs.items || []).map(renderJob));
      if (jobs.items && jobs.items.length === 0) jobsBox.append(el('p', { class: 'muted' }, 'No jobs: this run builds nothing (a promotion releases an earlier build).'));
      if (isFinal(current)) {
        ended = true;
        if (!artifactsLoaded) {
          artifactsLoaded = true;
          loadArtifacts().catch((error) => setLive(error.message, true));
        }
      }
    }

    function renderJob(job) {
      const steps = el('table', { class: 'steps responsive' },
        el('caption', {}, 'Steps of ' + job.name),
        el('thead', {}, el('tr', {}, ['#', 'Step', 'State', 'Duration', 'Exit code'].map((heading) => el('th', { scope: 'col' }, heading)))),
        el('tbody', {}, job.steps.map((step) => row([
          String(step.index),
          { header: true, content: step.name },
          badge(step.state),
          step.duration_ms !== null && step.duration_ms !== undefined ? formatDuration(step.duration_ms) : formatDuration(between(step.started_at, step.finished_at)),
          step.exit_code === null || step.exit_code === undefined ? '—' : String(step.exit_code),
        ]))));
      labelCells(steps);
      const duration = formatDuration(between(job.steps.length ? job.steps[0].started_at : job.created_at, job.steps.length && job.steps[job.steps.length - 1].finished_at));
      return el('article', { class: 'card job', 'data-job': job.job_id },
        el('h3', {}, job.name, ' ', badge(job.status)),
        el('p', { class: 'muted' }, 'Job ' + job.job_id + ' · attempt ' + job.attempt + ' of ' + job.max_attempts +
          (job.agent_id ? ' · agent ' + job.agent_id : '') + ' · ' + duration),
        job.failure_reason ? el('p', { class: 'notice error' }, job.failure_reason) : null,
        el('div', { class: 'table-wrap' }, steps));
    }

    function matches(line) {
      const needle = search.value.trim().toLowerCase();
      return (!level.value || line.dataset.level === level.value) && (!needle || line.dataset.text.includes(needle));
    }

    function highlight(line) {
      const message = line.querySelector('.message');
      const text = line.dataset.message;
      const needle = search.value.trim();
      if (!needle) {
        message.textContent = text;
        return;
      }
      const lower = text.toLowerCase();
      const wanted = needle.toLowerCase();
      const parts = [];
      let at = 0;
      for (let found = lower.indexOf(wanted); found !== -1; found = lower.indexOf(wanted, at)) {
        parts.push(text.slice(at, found), el('mark', {}, text.slice(found, found + wanted.length)));
        at = found + wanted.length;
      }
      parts.push(text.slice(at));
      message.replaceChildren(...parts.map((part) => (part instanceof Node ? part : document.createTextNode(part))));
    }

    function updateCount() {
      const shown = log.querySelectorAll('li:not([hidden])').length;
      count.textContent = total + (total === 1 ? ' line' : ' lines') + (shown !== total ? ', ' + shown + ' shown' : '') + (ended ? '' : ' · following live');
    }

    function filterLog() {
      for (const line of log.children) {
        line.hidden = !matches(line);
        highlight(line);
      }
      updateCount();
    }

    function appendLine(line) {
      const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      const levelName = line.level || 'INFO';
      const item = el('li', { class: 'level-' + levelName.toLowerCase(), 'data-level': levelName },
        el('time', { datetime: new Date(line.timestamp).toISOString() }, new Date(line.timestamp).toLocaleTimeString()),
        el('span', { class: 'level' }, levelName),
        el('span', { class: 'source' }, line.job_id ? 'job ' + line.job_id + (line.step !== undefined ? '/' + line.step : '') : 'davit'),
        el('span', { class: 'message' }, line.message));
      item.dataset.message = line.message;
      item.dataset.text = line.message.toLowerCase();
      item.hidden = !matches(item);
      if (search.value.trim()) highlight(item);
      log.append(item);
      total++;
      if (atBottom) log.scrollTop = log.scrollHeight;
    }

    // The log, live: every stored line first, then each line as it is stored; the server ends
    // a response after 30 s and EventSource resumes with Last-Event-ID; `end` closes it.
    const source = new EventSource('/api/v1/logs/' + deploymentId + '?follow=true');
    let pending = [];
    let scheduled = false;
    source.onmessage = (event) => {
      pending.push(JSON.parse(event.data));
      if (!scheduled) {
        scheduled = true;
        window.requestAnimationFrame(() => {
          scheduled = false;
          const lines = pending;
          pending = [];
          lines.forEach(appendLine);
          updateCount();
        });
      }
    };
    source.addEventListener('end', () => {
      source.close();
      ended = true;
      updateCount();
      refresh().catch(() => {});
    });
    source.addEventListener('stream_error', (event) => setLive('Log stream: ' + JSON.parse(event.data).message, true));

    async function loadArtifacts() {
      const table = document.getElementById('run-artifacts');
      const artifacts = await all('/api/v1/artifacts?pipeline_id=' + encodeURIComponent(pipelineId));
      const mine = artifacts.filter((artifact) => String(artifact.deployment_id) === String(deploymentId));
      fillTable(table, mine.length ? mine.map((artifact) => row([
        { header: true, content: (artifact.kind || 'files') + ' · ' + artifact.version },
        el('code', { title: artifact.digest }, short(artifact.digest, 16)),
        formatBytes(artifact.size_bytes),
        timeCell(artifact.created_at),
        el('a', { href: '/api/v1/artifacts/' + artifact.artifact_id, download: '' }, 'Download'),
      ])) : [el('tr', {}, el('td', { colspan: 5, class: 'muted' }, ended ? 'This run stored no artifacts.' : 'Artifacts appear when the build ends.'))]);
    }
    loadArtifacts().catch(() => {});

    let stop = null;
    stop = every(2000, async () => {
      await refresh();
      if (ended && stop) {
        stop();
        setLive('Run ended');
      }
    });
  };

  pages.deployment = function () {
    const deploymentId = main.dataset.deploymentId;
    const summary = document.getElementById('summary');
    const rollout = document.getElementById('rollout');
    const regions = document.getElementById('regions');
    const events = document.getElementById('events');
    const result = document.getElementById('action-result');
    const buttons = {
      approve: document.getElementById('action-approve'),
      cancel: document.getElementById('action-cancel'),
      rollback: document.getElementById('action-rollback'),
    };

    function items(list, pairs) {
      replaceChildren(list, pairs.flatMap(([term, value]) => [el('dt', {}, term), el('dd', {}, value === null || value === undefined || value === '' ? '—' : value)]));
    }

    function strategyText(strategy) {
      if (!strategy || !strategy.strategy) return '—';
      if (strategy.strategy === 'rolling') {
        const batch = strategy.batch || {};
        return 'rolling, ' + (batch.hosts ? batch.hosts + ' host(s)' : (batch.percent || '?') + ' % of hosts') + ' per batch, at most ' + strategy.max_unavailable + ' unavailable';
      }
      if (strategy.strategy === 'canary') return 'canary, steps ' + (strategy.steps || []).join(' → ') + ' %';
      return strategy.strategy.replace('_', '-');
    }

    function batchesText(current) {
      const strategy = current.rollout.strategy || {};
      const hosts = current.rollout.hosts;
      if (strategy.strategy !== 'rolling' || hosts.length === 0) return null;
      const batch = strategy.batch || {};
      const perBatch = Math.max(1, batch.hosts || Math.ceil(hosts.length * (batch.percent || 100) / 100));
      const batchCount = Math.ceil(hosts.length / perBatch);
      const done = hosts.filter((host) => host.weight === 100).length;
      return Math.min(batchCount, Math.floor(done / perBatch) + (done < hosts.length ? 1 : 0)) + ' of ' + batchCount + ' (' + done + ' of ' + hosts.length + ' hosts switched)';
    }

    function health(host) {
      if (host.lost) return 'lost';
      if (host.release === 'failed') return 'failed';
      if (host.release === 'healthy') return 'healthy';
      if (host.release === 'running') return 'running';
      return host.release;
    }

    function render(current) {
      const status = runStatus(current);
      const waitingForApproval = !isFinal(current) && !current.rollout && current.required_approvals && current.approvals.length < current.required_approvals;
      items(summary, [
        ['Status', badge(status)],
        ['Environment', current.environment],
        ['Commit', el('code', {}, current.commit_hash)],
        ['Branch', current.branch],
        ['Approvals', current.required_approvals
          ? current.approvals.length + ' of ' + current.required_approvals + (current.approvals.length ? ' (' + current.approvals.map((approval) => approval.username).join(', ') + ')' : '')
          : 'not required'],
        ['Started', timeCell(current.start_time || current.created_at)],
        ['Ended', current.end_time ? timeCell(current.end_time) : 'not yet'],
        ['Reason', current.status_reason],
        ['Rollback of', current.rollback_of ? link('/deployments/' + current.rollback_of, '#' + current.rollback_of) : null],
        ['Releases the build of', current.release_of ? link('/runs/' + current.release_of, '#' + current.release_of) : null],
      ]);
      if (buttons.approve) buttons.approve.hidden = !waitingForApproval;
      if (buttons.cancel) buttons.cancel.hidden = isFinal(current);
      if (buttons.rollback) buttons.rollback.hidden = !isFinal(current);
      if (!current.rollout) {
        items(rollout, [['Hosts', 'The rollout has not started (or this pipeline deploys to no hosts).']]);
        replaceChildren(regions, []);
        return;
      }
      const plan = current.rollout;
      items(rollout, [
        ['Release', plan.release + (plan.previous ? ' (replacing ' + plan.previous + ')' : '')],
        ['Artifact', el('code', { title: plan.artifact_digest }, plan.artifact_kind + ' ' + short(plan.artifact_digest, 16))],
        ['Strategy', strategyText(plan.strategy)],
        ['Batch', batchesText(current)],
        ['Canary step', plan.canary_step ? plan.canary_step + ' (' + ((plan.strategy.steps || [])[plan.canary_step - 1] || '?') + ' %)' : null],
        ['Canary verdict', plan.canary_verdict],
        ['Rolling back', plan.rolling_back],
      ]);
      const byRegion = new Map();
      for (const host of plan.hosts) {
        const region = host.region || 'no region';
        if (!byRegion.has(region)) byRegion.set(region, []);
        byRegion.get(region).push(host);
      }
      replaceChildren(regions, Array.from(byRegion.entries()).map(([region, hosts]) => {
        const switched = hosts.filter((host) => host.weight === 100).length;
        const table = el('table', { class: 'responsive hosts' },
          el('caption', {}, 'Region ' + region + ': ' + switched + ' of ' + hosts.length + ' hosts on the new release'),
          el('thead', {}, el('tr', {}, ['Host', 'New release', 'Traffic', 'Health', 'Old release', 'Failure'].map((heading) => el('th', { scope: 'col' }, heading)))),
          el('tbody', {}, hosts.map((host) => row([
            { header: true, content: host.name + (host.busy ? ' (working…)' : '') },
            badge(host.release),
            el('span', { class: 'weight' }, el('meter', { min: 0, max: 100, value: host.weight, 'aria-label': 'Traffic on the new release on ' + host.name }), ' ' + host.weight + ' %'),
            badge(health(host)),
            host.old_stopped ? 'stopped' : 'kept',
            host.failure,
          ], { 'data-host': host.name }))));
        labelCells(table);
        return el('section', { class: 'region', 'data-region': region }, el('h3', {}, region), el('div', { class: 'table-wrap' }, table));
      }));
    }

    let refreshTimer = null;
    const hostNames = new Map();
    async function refresh() {
      const current = await api('/api/v1/deployments/' + deploymentId);
      for (const host of current.rollout ? current.rollout.hosts : []) hostNames.set(host.agent_id, host.name);
      render(current);
      return current;
    }
    function refreshSoon() {
      window.clearTimeout(refreshTimer);
      refreshTimer = window.setTimeout(() => refresh().catch((error) => setLive(error.message, true)), 150);
    }

    // Progress events, live. Each event's SSE name is its kind; the stream ends after the
    // final one, which is written with the final status.
    const KINDS = ['queued', 'rollout_started', 'approval_required', 'approved', 'host_started', 'host_healthy', 'host_unhealthy',
      'host_failed', 'weight_changed', 'host_switched', 'canary_step', 'analysis_verdict', 'rollback_started', 'old_stopped',
      'new_stopped', 'service_retired', 'succeeded', 'failed', 'rolled_back'];
    const FINAL = ['succeeded', 'failed', 'rolled_back'];
    const source = new EventSource('/api/v1/deployments/' + deploymentId + '/events?follow=true');
    function onEvent(event) {
      const data = JSON.parse(event.data);
      const where = [data.region ? 'region ' + data.region : null, data.host ? hostNames.get(data.host) || 'host ' + data.host : null, data.weight !== undefined ? data.weight + ' %' : null].filter(Boolean).join(' · ');
      events.append(el('li', { class: 'event kind-' + data.kind, 'data-kind': data.kind },
        el('time', { datetime: new Date(data.at).toISOString() }, new Date(data.at).toLocaleTimeString()),
        ' ', badge(data.kind), where ? el('span', { class: 'muted' }, ' ' + where) : null,
        el('span', { class: 'message' }, ' ' + data.message)));
      refreshSoon();
      if (FINAL.includes(data.kind)) {
        source.close();
        setLive('Deployment ended');
      }
    }
    for (const kind of KINDS) source.addEventListener(kind, onEvent);
    source.onmessage = onEvent;
    source.addEventListener('stream_error', (event) => setLive('Event stream: ' + JSON.parse(event.data).message, true));

    for (const [action, button] of Object.entries(buttons)) {
      if (!button) continue;
      button.addEventListener('click', async () => {
        button.disabled = true;
        result.className = '';
        try {
          const answer = await api('/api/v1/deployments/' + deploymentId + '/' + action, 'POST', {});
          result.replaceChildren(action === 'rollback' && answer && answer.deployment_id
            ? el('span', {}, 'Rollback started as ', link('/deployments/' + answer.deployment_id, 'deployment ' + answer.deployment_id), '.')
            : el('span', {}, action === 'approve' ? 'Approved.' : 'Cancelled.'));
          result.className = 'notice ok';
        } catch (error) {
          result.textContent = error.message;
          result.className = 'notice error';
        } finally {
          button.disabled = false;
          refreshSoon();
        }
      });
    }

    every(5000, refresh);
  };

  async function environmentNames() {
    const reply = await api('/api/v1/environments');
    return (reply.items || []).map((environment) => environment.name);
  }

  pages.environments = function () {
    const matrix = document.getElementById('matrix');
    const settings = document.getElementById('environment-settings');

    // The live version per pipeline, environment and region (GET /api/v1/environments/matrix).
    async function cellsFromMatrix(names, pipelines) {
      const reply = await api('/api/v1/environments/matrix');
      // One item per pipeline, environment and region: a cell lists its regions, each with
      // the version it runs (regions can differ while a rollout goes from one to the next).
      const cells = new Map();
      for (const item of reply.items || []) {
        const key = item.pipeline_id + '\u0000' + item.environment;
        if (!cells.has(key)) cells.set(key, { versions: [] });
        cells.get(key).versions.push({
          region: item.region || null,
          hosts: item.hosts || [],
          deployment_id: item.deployment_id,
          commit_hash: item.commit_hash,
          artifact_digest: item.artifact_digest,
          since: item.finished_at,
        });
      }
      return { names, pipelines, cells };
    }

    every(5000, async () => {
      const [environments, pipelines] = await Promise.all([api('/api/v1/environments'), all('/api/v1/pipelines')]);
      const names = (environments.items || []).map((environment) => environment.name);
      const data = await cellsFromMatrix(names, pipelines);
      replaceChildren(matrix.tHead, [el('tr', {}, el('th', { scope: 'col' }, 'Pipeline'), names.map((name) => el('th', { scope: 'col' }, name)))]);
      fillTable(matrix, pipelines.map((pipeline) => row([{ header: true, content: pipeline.name }].concat(names.map((name) => {
        const cell = data.cells.get(pipeline.pipeline_id + '\u0000' + name);
        if (!cell) return el('span', { class: 'muted' }, 'nothing yet');
        return el('div', { class: 'cell' }, cell.versions.map((version) => el('div', { class: 'version', 'data-region': version.region || '' },
          version.region ? el('strong', {}, version.region + (version.hosts.length ? ' (' + version.hosts.join(', ') + ')' : '') + ': ') : null,
          link('/deployments/' + version.deployment_id, 'commit ' + short(version.commit_hash, 8)),
          version.artifact_digest ? el('div', {}, el('code', { title: version.artifact_digest }, 'sha256:' + short(version.artifact_digest, 12))) : null,
          el('div', { class: 'muted' }, 'since ', timeCell(version.since)))));
      })))));
      fillTable(settings, (environments.items || []).map((environment) => row([
        { header: true, content: environment.name },
        environment.promote_from || '—',
        environment.required_approvals ? String(environment.required_approvals) : 'none',
        environment.allowed_branches ? environment.allowed_branches.join(', ') : 'any',
        timeCell(environment.updated_at),
      ])));
    });
  };

  // ---------- delivery metrics ----------

  const DAY = 86400000;

  // A bar chart of `values` (null: no data) with `labels`, as inline SVG; `stacked` draws a
  // second, red part of each bar.
  function barChart(container, title, labels, values, stacked, unit) {
    const width = 640;
    const height = 200;
    const left = 44;
    const bottom = 28;
    const top = Math.max(1, ...values.map((value, index) => (value || 0) + (stacked ? stacked[index] || 0 : 0)));
    const scale = (height - bottom - 10) / top;
    const barWidth = Math.max(2, (width - left - 8) / Math.max(1, values.length) - 2);
    const chart = svg('svg', { viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': title, preserveAspectRatio: 'none', class: 'chart-svg' },
      svg('title', {}, title),
      svg('line', { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: 'axis' }),
      svg('text', { x: left - 6, y: 14, 'text-anchor': 'end', class: 'tick' }, formatNumber(top) + (unit || '')),
      svg('text', { x: left - 6, y: height - bottom, 'text-anchor': 'end', class: 'tick' }, '0'));
    values.forEach((value, index) => {
      const x = left + 4 + index * (barWidth + 2);
      const total = value || 0;
      const barHeight = total * scale;
      const bar = svg('rect', { x, y: height - bottom - barHeight, width: barWidth, height: Math.max(0, barHeight), class: value === null ? 'bar empty' : 'bar' },
        svg('title', {}, labels[index] + ': ' + (value === null ? 'no data' : formatNumber(total) + (unit || ''))));
      chart.append(bar);
      if (stacked && stacked[index]) {
        const failedHeight = stacked[index] * scale;
        chart.append(svg('rect', { x, y: height - bottom - barHeight - failedHeight, width: barWidth, height: failedHeight, class: 'bar failed' },
          svg('title', {}, labels[index] + ': ' + stacked[index] + ' failed or rolled back')));
      }
    });
    const step = Math.max(1, Math.ceil(values.length / 6));
    labels.forEach((label, index) => {
      if (index % step === 0 && left + 4 + index * (barWidth + 2) < width - 48) chart.append(svg('text', { x: left + 4 + index * (barWidth + 2), y: height - 8, class: 'tick' }, label));
    });
    replaceChildren(container, [chart]);
  }

  function formatNumber(value) {
    if (value === null || value === undefined) return '—';
    return Math.abs(value) >= 10 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(2);
  }

  function hours(seconds) {
    return seconds === null || seconds === undefined ? '—' : formatDuration(seconds * 1000);
  }

  pages.delivery = function () {
    const range = document.getElementById('delivery-range');
    const pipelineSelect = document.getElementById('delivery-pipeline');
    const environmentSelect = document.getElementById('delivery-environment');
    const source = document.getElementById('delivery-source');
    const tiles = document.getElementById('delivery-summary');

    async function setUp() {
      const [pipelines, names] = await Promise.all([all('/api/v1/pipelines'), environmentNames()]);
      for (const pipeline of pipelines) pipelineSelect.append(el('option', { value: pipeline.pipeline_id }, pipeline.name));
      replaceChildren(environmentSelect, names.map((name) => el('option', { value: name, selected: name === 'production' }, name)));
    }

    async function load() {
      const to = Date.now();
      const from = to - Number(range.value) * DAY;
      const bucket = Number(range.value) > 90 ? 'week' : 'day';
      const query = new URLSearchParams({ from: new Date(from).toISOString(), to: new Date(to).toISOString(), bucket, environment: environmentSelect.value });
      if (pipelineSelect.value) query.set('pipeline_id', pipelineSelect.value);
      const data = await api('/api/v1/monitoring/delivery?' + query.toString());
      source.textContent = 'Successful deployments to ' + data.environment + ' by ' + data.bucket + '; lead time runs from the commit to the end of its deployment.';
      const summary = data.summary || {};
      replaceChildren(tiles, [
        ['Deployments', formatNumber(summary.deployments)],
        ['Deployment frequency', formatNumber(summary.deployment_frequency_per_day) + ' per day'],
        ['Lead time (median)', hours(summary.lead_time_seconds_p50)],
        ['Change failure rate', summary.change_failure_rate === null || summary.change_failure_rate === undefined ? '—' : (summary.change_failure_rate * 100).toFixed(1) + ' %'],
        ['Time to restore (mean)', hours(summary.time_to_restore_seconds_mean)],
      ].map(([label, value]) => el('div', { class: 'tile' }, el('span', { class: 'tile-label' }, label), el('strong', {}, value))));
      const series = data.series || [];
      const labels = series.map((entry) => new Date(entry.start).toLocaleDateString(undefined, { month: 'short', day: 'numeric' }));
      barChart(document.getElementById('chart-deployments'), 'Deployments per ' + data.bucket + ' (successful, and failed or rolled back in red)', labels,
        series.map((entry) => entry.deployments), series.map((entry) => (entry.failed || 0) + (entry.rolled_back || 0)), '');
      const durationChart = (id, what, seconds) => {
        const largest = Math.max(0, ...seconds.map((value) => value || 0));
        const [divisor, unit] = largest < 120 ? [1, ' s'] : largest < 7200 ? [60, ' min'] : largest < 172800 ? [3600, ' h'] : [86400, ' d'];
        barChart(document.getElementById(id), what + ' per ' + data.bucket + ' in' + unit, labels,
          seconds.map((value) => (value === null || value === undefined ? null : value / divisor)), null, unit);
      };
      durationChart('chart-lead-time', 'Median lead time', series.map((entry) => entry.lead_time_seconds_p50));
      barChart(document.getElementById('chart-failure-rate'), 'Change failure rate per ' + data.bucket + ' in percent', labels,
        series.map((entry) => {
          const failed = (entry.failed || 0) + (entry.rolled_back || 0);
          return entry.deployments + failed ? (100 * failed) / (entry.deployments + failed) : null;
        }), null, ' %');
      durationChart('chart-restore', 'Mean time to restore', series.map((entry) => entry.restore_seconds_mean));
    }

    setUp().catch((error) => setLive(error.message, true)).then(() => {
      for (const control of [range, pipelineSelect, environmentSelect]) control.addEventListener('change', () => load().catch((error) => setLive(error.message, true)));
      every(15000, load);
    });
  };

  pages.agents = function () {
    const table = document.getElementById('agents');
    const filter = onInput('agent-filter', render);
    let agents = [];
    function render() {
      const needle = filter.value.trim().toLowerCase();
      const shown = agents.filter((agent) => !needle || (agent.name + ' ' + Object.entries(agent.labels).map(([k, v]) => k + '=' + v).join(' ')).toLowerCase().includes(needle));
      fillTable(table, shown.map((agent) => row([
        { header: true, content: agent.name + ' (#' + agent.agent_id + ')' },
        el('span', {}, badge(agent.state), agent.state_reason ? el('span', { class: 'muted' }, ' ' + agent.state_reason) : null),
        el('span', { class: 'labels' }, Object.entries(agent.labels).map(([key, value]) => el('span', { class: 'label' }, key + '=' + value))),
        agent.running_jobs.length ? el('span', {}, agent.running_jobs.map((job, index) => [index ? ', ' : '', link('/runs/' + job.deployment_id, 'job ' + job.job_id)])) : 'none',
        agent.running_jobs.length + ' / ' + agent.capacity,
        agent.executors.join(', '),
        agent.version,
        timeCell(agent.connected_at),
      ], { 'data-state': agent.state })));
    }
    every(3000, async () => {
      const reply = await api('/api/v1/agents');
      agents = reply.items || [];
      render();
    });
  };

  pages.cluster = function () {
    const summary = document.getElementById('cluster-summary');
    const table = document.getElementById('cluster-nodes');
    every(3000, async () => {
      const [status, ready] = await Promise.all([
        api('/api/v1/cluster/status'),
        fetch('/readyz', { credentials: 'same-origin' }).then((response) => response.ok).catch(() => false),
      ]);
      replaceChildren(summary, [
        ['This node', '#' + status.node_id + ' (' + status.state.toLowerCase() + ')'],
        ['Leader', status.leader_id ? '#' + status.leader_id : 'none (no quorum?)'],
        ['Term', String(status.term)],
        ['Last log index', String(status.last_log_index ?? '—')],
        ['Committed / applied', (status.commit_index ?? '—') + ' / ' + (status.applied_index ?? '—')],
        ['Snapshot index', String(status.snapshot_index ?? '—')],
        ['Storage', status.storage],
        ['This node ready', ready ? 'yes' : 'no'],
      ].flatMap(([term, value]) => [el('dt', {}, term), el('dd', {}, value)]));
      const regions = new Set();
      fillTable(table, Object.entries(status.nodes).map(([id, node]) => {
        regions.add(node.region || '—');
        const numericId = Number(id);
        const role = numericId === status.leader_id ? 'leader' : status.learners.includes(numericId) ? 'learner' : 'follower';
        const acknowledged = status.replication ? status.replication[id] : undefined;
        let lag = '—';
        let healthState = 'unknown';
        if (status.replication) {
          if (acknowledged === null || acknowledged === undefined) {
            healthState = 'behind';
            lag = 'no answer yet';
          } else {
            const entries = (status.last_log_index || 0) - acknowledged;
            lag = entries + (entries === 1 ? ' entry' : ' entries');
            healthState = entries === 0 ? 'in_sync' : entries < 100 ? 'catching_up' : 'behind';
          }
        } else if (numericId === status.node_id) {
          healthState = ready ? 'in_sync' : 'behind';
        }
        return row([
          { header: true, content: '#' + id + (numericId === status.node_id ? ' (this node)' : '') },
          node.region || '—',
          badge(role),
          node.http_addr,
          acknowledged === undefined || acknowledged === null ? '—' : String(acknowledged),
          status.replication ? lag : 'shown on the leader',
          badge(healthState),
        ], { 'data-node': id });
      }));
      summary.append(el('dt', {}, 'Regions'), el('dd', {}, Array.from(regions).join(', ')));
    });
  };

  pages.artifacts = function () {
    const table = document.getElementById('artifacts');
    const filter = onInput('artifact-filter', render);
    let artifacts = [];
    let names = new Map();
    function render() {
      const needle = filter.value.trim().toLowerCase();
      const shown = artifacts.filter((artifact) => !needle || [artifact.kind, artifact.version, artifact.digest, names.get(artifact.pipeline_id)].join(' ').toLowerCase().includes(needle));
      fillTable(table, shown.map((artifact) => row([
        { header: true, content: '#' + artifact.artifact_id + ' ' + (artifact.kind || 'files') },
        names.get(artifact.pipeline_id) || '#' + artifact.pipeline_id,
        artifact.version,
        artifact.deployment_id ? link('/runs/' + artifact.deployment_id, '#' + artifact.deployment_id) : '—',
        el('code', { title: artifact.digest }, short(artifact.digest, 16)),
        formatBytes(artifact.size_bytes),
        timeCell(artifact.created_at),
        el('a', { href: '/api/v1/artifacts/' + artifact.artifact_id, download: '' }, 'Download'),
      ])));
    }
    every(5000, async () => {
      const [list, pipelines] = await Promise.all([all('/api/v1/artifacts'), all('/api/v1/pipelines')]);
      names = new Map(pipelines.map((pipeline) => [pipeline.pipeline_id, pipeline.name]));
      artifacts = list.reverse();
      render();
    });
  };

  pages.config = function () {
    const select = document.getElementById('config-environment');
    const table = document.getElementById('config');
    async function load() {
      if (!select.value) return;
      const reply = await api('/api/v1/configs/' + encodeURIComponent(select.value));
      fillTable(table, Object.entries(reply.variables || {}).map(([key, variable]) => row([
        { header: true, content: el('code', {}, key) },
        variable.secret ? el('span', { class: 'masked', title: 'secret: never shown' }, variable.value) : el('code', {}, variable.value),
        variable.secret ? badge('secret') : 'plain',
        variable.scope,
      ])));
      if (!Object.keys(reply.variables || {}).length) fillTable(table, [el('tr', {}, el('td', { colspan: 4, class: 'muted' }, 'No variables in ' + select.value + '.'))]);
    }
    environmentNames().then((names) => {
      replaceChildren(select, names.map((name) => el('option', { value: name }, name)));
      select.addEventListener('change', () => load().catch((error) => setLive(error.message, true)));
      every(5000, load);
    }).catch((error) => setLive(error.message, true));
  };

  pages.audit = function () {
    const table = document.getElementById('audit');
    const filter = onInput('audit-filter', render);
    const verify = document.getElementById('audit-verify');
    let entries = [];
    let users = new Map();
    function render() {
      const needle = filter.value.trim().toLowerCase();
      const shown = entries.filter((entry) => !needle || (entry.action + ' ' + entry.details).toLowerCase().includes(needle)).slice(0, 500);
      fillTable(table, shown.map((entry) => row([
        { header: true, content: '#' + entry.audit_id },
        timeCell(entry.timestamp),
        entry.user_id ? users.get(entry.user_id) || '#' + entry.user_id : 'system',
        el('code', {}, entry.action),
        el('span', { class: 'details' }, entry.details),
        entry.source || '—',
      ])));
    }
    every(5000, async () => {
      const [list, userList, check] = await Promise.all([
        all('/api/v1/audit-logs', 10),
        all('/api/v1/users').catch(() => []),
        api('/api/v1/audit-logs/verify').catch(() => null),
      ]);
      users = new Map(userList.map((user) => [user.user_id, user.username]));
      entries = list.reverse();
      if (check) verify.textContent = check.ok ? 'Hash chain verified: ' + check.entries_checked + ' entries.' : 'Hash chain BROKEN at entry ' + check.first_bad_entry + ': ' + check.problem;
      render();
    });
  };

  if (pages[page]) pages[page]();
})();
