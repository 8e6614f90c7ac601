// End-to-end test of the admin portal in headless Chromium (Debian's /usr/bin/chromium),
// driven by playwright-core. Run by tests/portal.rs:
//
//   node tests/portal/e2e.mjs <base url> <admin token> <cache name> <auditor token> <screenshot dir> <other cache> <account name>
//
// <account name> owns <cache name>. Logs in, opens the cache, checks its charts plot real usage, mints a token, takes a snapshot
// (downloads it, restores it into a new cache), downloads an invoice CSV, filters the audit log, checks the phone layout, and that an auditor of the
// cache's account sees no write controls and not <other cache> (another account's). Screenshots go to <screenshot dir>. Exits non-zero on the first failure.

import { check, launch } from './browser.mjs';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const [base, adminToken, cacheName, auditorToken, shots, otherCache, accountName] = process.argv.slice(2);
if (!accountName) {
  console.error('usage: e2e.mjs <base url> <admin token> <cache name> <auditor token> <screenshot dir> <other cache> <account name>');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const browser = await launch({ acceptDownloads: true });

/** A new tab (its own sessionStorage, so its own login) that records script errors, CSP
 * reports and requests to anywhere but the control plane. */
async function open(viewport) {
  const page = await browser.newPage();
  await page.setViewportSize(viewport);
  page.problems = [];
  page.on('pageerror', (e) => page.problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 40[14]/.test(m.text())) page.problems.push(`console: ${m.text()}`);
  });
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(base) && !u.startsWith('blob:') && !u.startsWith('data:')) page.problems.push(`request to ${u}`);
  });
  return { page };
}

async function login(page, token) {
  const resp = await page.goto(`${base}/portal/`);
  const csp = resp.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), 'the portal is served with a strict Content-Security-Policy');
  const field = page.getByLabel('API token', { exact: true });
  await field.focus();
  await page.keyboard.type(token);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
}

/** No placeholder leaked into the page as text. */
async function noStrayText(page, what) {
  const text = await page.locator('main').innerText();
  check(!/\b(null|undefined|NaN|\[object Object\])\b/.test(text), `${what}: no "null", "undefined" or "NaN" shown`);
}

function clean(page, what) {
  check(page.problems.length === 0, `${what}: no script errors, CSP violations or outside requests (${page.problems.join('; ')})`);
}

try {
  // ---- desktop, as the platform admin
  const { page } = await open({ width: 1280, height: 800 });
  await login(page, adminToken);
  check(await page.getByRole('link', { name: cacheName }).first().isVisible(), 'the overview lists the cache');
  check(await page.getByRole('link', { name: otherCache }).isVisible(), "the admin sees every account's caches");
  const ecpuNow = await page.locator('.card', { hasText: 'ECPU/s now' }).locator('.card-value').innerText();
  check(Number(ecpuNow.replace(/,/g, '')) > 0, `the overview shows the ECPU/s of the traffic (${ecpuNow})`);
  await noStrayText(page, 'overview');
  await page.screenshot({ path: join(shots, '01-overview.png'), fullPage: true });
  // The cache list pages and finds caches by the start of their names.
  const finder = page.getByRole('form', { name: 'Find caches' });
  await finder.getByLabel('Name starts with').fill(otherCache.slice(0, 3));
  await finder.getByRole('button', { name: 'Find' }).click();
  await page.getByText('Page 1: 1 cache.').waitFor();
  const listed = page.getByRole('table', { name: 'All caches' });
  check(await listed.getByRole('link', { name: otherCache }).isVisible()
    && (await listed.getByRole('link', { name: cacheName, exact: true }).count()) === 0, 'the cache list finds a cache by the start of its name');
  await finder.getByLabel('Name starts with').fill('');
  await finder.getByRole('button', { name: 'Find' }).click();
  await page.getByRole('link', { name: cacheName }).first().waitFor();

  // Open the cache (keyboard: focus the link, Enter).
  await page.getByRole('link', { name: cacheName }).first().focus();
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { level: 1, name: `Cache ${cacheName}` }).waitFor();
  const chart = (name) => page.getByRole('figure', { name, exact: true });
  const ecpu = chart('ECPU per second');
  await ecpu.locator('svg path.line').first().waitFor();
  check(Number(await ecpu.getAttribute('data-nonzero')) > 0, 'the ECPU chart plots non-zero usage');
  const commands = chart('Commands per minute');
  check(Number(await commands.getAttribute('data-nonzero')) > 0, 'the commands chart plots the traffic');
  const hits = chart('Hit rate');
  check(Number(await hits.getAttribute('data-points')) > 0, 'the hit-rate chart plots the reads');
  // The test keeps one client connected to the cache throughout.
  const conns = chart('Peak connections');
  check(await conns.locator('svg path.line').count() > 0 && await conns.locator('p.nodata').count() === 0,
    'the connections chart is drawn (not an empty state)');
  check(Number(await conns.getAttribute('data-nonzero')) > 0, 'the connections chart plots the connected client');
  const connTicks = await conns.locator('svg text.tick[x="46"]').allTextContents();
  check(connTicks.every((t) => /^\d[\d,]*$/.test(t)) && new Set(connTicks).size === connTicks.length,
    `the connections chart's axis counts in whole numbers (${connTicks.join(', ')})`);
  // The readout follows the keyboard.
  await ecpu.locator('svg').focus();
  await page.keyboard.press('End');
  check((await ecpu.locator('.readout').innerText()).length > 0, 'the chart reads out a point for keyboard users');
  await page.getByLabel('Time range', { exact: true }).selectOption('24h');
  await page.locator('figure.chart svg path.line').first().waitFor();
  await chart('Commands per hour').waitFor();
  check(Number(await chart('Commands per hour').getAttribute('data-nonzero')) > 0, 'hourly charts (24 h) plot the usage too');
  check(Number(await chart('Peak connections').getAttribute('data-nonzero')) > 0, 'and the connections');
  await page.getByLabel('Time range', { exact: true }).selectOption('1h');
  await page.locator('figure.chart svg path.line').first().waitFor();
  await page.getByRole('button', { name: 'Mint a 15-minute token for these snippets' }).click();
  await page.locator('pre code', { hasText: 'REDISCLI_AUTH=\'ey' }).waitFor();
  check(true, 'minting a token fills it into the redis-cli and redis-py snippets');
  await noStrayText(page, 'cache page');
  await page.screenshot({ path: join(shots, '02-cache.png'), fullPage: true });

  // Users and tokens.
  await page.getByRole('link', { name: 'Users and tokens' }).click();
  await page.getByRole('table', { name: 'Active tokens' }).waitFor();
  const before = await page.getByRole('button', { name: /^Revoke token/ }).count();
  await page.getByRole('button', { name: 'Mint token' }).click();
  await page.getByLabel('Secret', { exact: true }).waitFor();
  check((await page.getByLabel('Secret', { exact: true }).inputValue()).startsWith('ey'), 'a minted token is shown once');
  await page.waitForFunction((n) => document.querySelectorAll('button[aria-label^="Revoke token"]').length === n + 1, before);
  check(true, `minting from the tokens page lists one more token (${before} → ${before + 1})`);
  const rotated = (await page.getByRole('button', { name: /^Rotate token/ }).first().getAttribute('aria-label')).replace('Rotate token ', '');
  await page.getByRole('button', { name: `Rotate token ${rotated}` }).click();
  await page.getByText(`Token ${rotated} revoked; its replacement`).waitFor();
  check((await page.getByRole('button', { name: `Revoke token ${rotated}` }).count()) === 0
    && (await page.getByRole('button', { name: /^Revoke token/ }).count()) === before + 1, 'rotating a token replaces it with a new one');
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: /^Revoke token/ }).first().click();
  await page.waitForFunction((n) => document.querySelectorAll('button[aria-label^="Revoke token"]').length === n, before);
  check(true, 'revoking a token removes it from the list');
  // A limited token: listed with its access, which rotating it keeps.
  await page.getByLabel('Permission', { exact: true }).selectOption('read-only');
  await page.getByLabel('Key patterns', { exact: true }).fill('app:* cfg');
  await page.getByRole('button', { name: 'Mint token' }).click();
  const limitedRows = page.getByRole('row').filter({ hasText: 'read-only on app:* cfg' });
  await limitedRows.first().waitFor();
  const limitedRotate = limitedRows.first().getByRole('button', { name: /^Rotate token/ });
  const limited = (await limitedRotate.getAttribute('aria-label')).replace('Rotate token ', '');
  await limitedRotate.click();
  await page.getByText(`Token ${limited} revoked; its replacement`).waitFor();
  check((await limitedRows.count()) === 1 && !(await limitedRows.first().innerText()).includes(limited),
    'a read-only token on some keys is listed so, and its rotation keeps that access');
  await page.getByRole('table', { name: 'Cache users' }).waitFor();
  await page.getByLabel('User name', { exact: true }).fill('app');
  await page.getByLabel('Access string', { exact: true }).fill('on ~app:* +@read');
  await page.getByRole('button', { name: 'Create user' }).click();
  await page.getByRole('button', { name: 'Delete user app' }).waitFor();
  check((await page.getByRole('table', { name: 'Cache users' }).innerText()).includes('on ~app:* +@read'), 'a cache user is created with its access string');
  await noStrayText(page, 'users and tokens');
  await page.screenshot({ path: join(shots, '03-users-and-tokens.png'), fullPage: true });

  // Snapshots: take one, download it as RDB, restore it into a new cache.
  await page.getByRole('link', { name: 'Snapshots' }).click();
  await page.getByRole('heading', { level: 1, name: `Cache ${cacheName}: snapshots` }).waitFor();
  await page.getByLabel('Name', { exact: true }).fill('portal-snap');
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  const snapDownload = page.getByRole('button', { name: 'Download snapshot portal-snap as RDB' });
  await snapDownload.waitFor({ timeout: 30000 });
  check((await page.getByRole('table', { name: `Snapshots of ${cacheName}` }).innerText()).includes('available'), 'the snapshot is listed as available');
  const [rdb] = await Promise.all([page.waitForEvent('download'), snapDownload.click()]);
  const rdbBytes = readFileSync(await rdb.path());
  check(rdb.suggestedFilename() === 'portal-snap.rdb' && /^(REDIS|VALKEY)\d{3,4}$/.test(rdbBytes.subarray(0, 9).toString()), 'the snapshot downloads as an RDB file');
  await page.getByLabel('Name of a new cache restored from portal-snap').fill(`${cacheName}-copy`);
  await page.getByRole('button', { name: 'Restore into a new cache' }).click();
  await page.getByRole('heading', { level: 1, name: `Cache ${cacheName}-copy` }).waitFor();
  await page.screenshot({ path: join(shots, '03b-restored-from-snapshot.png'), fullPage: true });
  // Deleting a cache asks for its name first; a wrong name deletes nothing.
  page.once('dialog', (d) => d.accept('not-its-name'));
  await page.getByRole('button', { name: 'Delete cache' }).click();
  await page.getByText('The name did not match: nothing was deleted.').waitFor();
  page.once('dialog', (d) => d.accept(`${cacheName}-copy`));
  await page.getByRole('button', { name: 'Delete cache' }).click();
  await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
  check((await page.getByRole('link', { name: `${cacheName}-copy` }).count()) === 0, 'a deleted cache leaves the overview');

  // A cache created with limits, an eviction policy, databases and tags.
  await page.getByLabel('Name', { exact: true }).fill('made-in-portal');
  await page.getByLabel('ECPU per second', { exact: true }).fill('5000');
  await page.getByLabel('Data storage (MB)', { exact: true }).fill('50');
  await page.getByLabel('Databases', { exact: true }).fill('4');
  await page.getByLabel('Eviction policy', { exact: true }).selectOption('noeviction');
  await page.getByLabel('Tags', { exact: true }).fill('team=web, env=test');
  await page.getByRole('button', { name: 'Create cache' }).click();
  await page.getByRole('heading', { level: 1, name: 'Cache made-in-portal' }).waitFor();
  const settings = await page.locator('dl.details').innerText();
  check(['5,000', '50 MB', 'noeviction', 'team=web', 'env=test'].every((s) => settings.includes(s)) && /Databases\s+4/.test(settings),
    `a cache is created with its limits, policy, databases and tags (${settings.replace(/\s+/g, ' ')})`);

  // Accounts: create one, a key for it (shown once), revoke it; rotate the signing key.
  await page.getByRole('link', { name: 'Accounts', exact: true }).click();
  await page.getByRole('heading', { level: 1, name: 'Accounts' }).waitFor();
  await page.getByLabel('Account name', { exact: true }).fill('portal-made');
  await page.getByRole('button', { name: 'Create account' }).click();
  await page.getByRole('heading', { level: 2, name: 'portal-made' }).waitFor();
  await page.getByLabel('Name of a new key for portal-made').fill('ci');
  await page.getByLabel('Role of a new key for portal-made').selectOption('auditor');
  await page.getByRole('button', { name: 'Create a key for portal-made' }).click();
  await page.getByLabel('Secret', { exact: true }).waitFor();
  const newKey = await page.getByLabel('Secret', { exact: true }).inputValue();
  check(newKey.length > 20, 'a new API key is shown once');
  const keyCheck = await fetch(`${base}/v1/me`, { headers: { Authorization: `Bearer ${newKey}` } });
  check(keyCheck.status === 200 && (await keyCheck.json()).role === 'auditor', 'the new key works, as an auditor');
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Revoke key ci of portal-made' }).click();
  await page.getByText('Key revoked.').waitFor();
  check((await fetch(`${base}/v1/me`, { headers: { Authorization: `Bearer ${newKey}` } })).status === 401, 'a revoked key stops working at once');
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Rotate the signing key' }).click();
  await page.getByText(/Signing key rotated/).waitFor();
  await page.screenshot({ path: join(shots, '03c-accounts.png'), fullPage: true });

  // Billing: an invoice and its CSV.
  await page.getByRole('link', { name: 'Billing', exact: true }).click();
  await page.getByRole('heading', { level: 1, name: 'Billing' }).waitFor();
  await page.locator('table, .notice, .error').first().waitFor();
  check((await page.getByRole('button', { name: /^Open the invoice/ }).count()) > 0, 'the billing page lists invoices');
  // The invoice of the cache's account, this month.
  await page.getByLabel('Account', { exact: true }).selectOption({ label: accountName });
  await page.getByLabel('Month', { exact: true }).fill(new Date().toISOString().slice(0, 7));
  await page.getByRole('button', { name: 'Show invoices' }).click();
  const openInvoice = page.getByRole('button', { name: new RegExp(`^Open the invoice of ${accountName} for`) });
  await openInvoice.waitFor();
  await openInvoice.click();
  await page.getByRole('heading', { level: 2, name: `Invoice ${new Date().toISOString().slice(0, 7)}: ${accountName}` }).waitFor();
  const lines = await page.getByRole('table', { name: 'Invoice lines' }).locator('tbody tr').allInnerTexts();
  check(lines.some((l) => l.startsWith(cacheName) && l.includes('ecpu')), `the invoice has the cache's ECPU line (${lines.length} lines)`);
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download CSV' }).click()]);
  const csv = readFileSync(await download.path(), 'utf8');
  check(download.suggestedFilename().endsWith('.csv') && csv.split('\n')[0].includes('meter') && csv.includes(`,${cacheName},ecpu,`),
    `the invoice downloads as CSV with the cache's lines (${download.suggestedFilename()})`);
  console.log(csv.split('\n').slice(0, 3).join('\n'));
  await noStrayText(page, 'invoice');
  await page.screenshot({ path: join(shots, '04-billing.png'), fullPage: true });
  // The printable invoice: the page as printed has no navigation, forms or buttons.
  await page.emulateMedia({ media: 'print' });
  check(!(await page.locator('header.top').isVisible()) && !(await page.getByRole('button', { name: 'Download CSV' }).isVisible())
    && (await page.locator('article.printable').isVisible()), 'the printed invoice shows the invoice alone');
  await page.screenshot({ path: join(shots, '04-invoice-print.png'), fullPage: true });
  await page.emulateMedia({ media: 'screen' });
  const est = page.getByRole('button', { name: 'Estimate' });
  await est.click();
  await page.locator('.estimate p, .estimate .notice, .estimate .error').first().waitFor();
  check(/About [0-9.]+ USD a month/.test(await page.locator('.estimate').innerText()), 'the estimate form prices a workload');

  // Audit: verify the chain, filter by action.
  await page.getByRole('link', { name: 'Audit', exact: true }).click();
  await page.getByRole('heading', { level: 1, name: 'Audit log' }).waitFor();
  await page.getByText(/Chain verified: all [0-9,]+ records link up/).waitFor();
  check(true, 'the audit page shows the hash chain verified');
  const all = await page.locator('table tbody tr').count();
  await page.getByLabel('Action', { exact: true }).fill('token.revoke');
  await page.getByLabel('Outcome', { exact: true }).selectOption('success');
  await page.getByRole('button', { name: 'Search' }).click();
  // Three revocations: the two rotated tokens and the revoked one.
  await page.waitForFunction(() => /Page 1: 3 records\b/.test(document.body.innerText));
  const actions = await page.locator('table tbody tr td:nth-child(4)').allInnerTexts();
  check(actions.length === 3 && actions.every((a) => a === 'token.revoke'), `filtering by action shows only token.revoke (${all} records before, ${actions.length} after)`);
  await noStrayText(page, 'audit page');
  await page.screenshot({ path: join(shots, '05-audit.png'), fullPage: true });

  // Engine pools: the cluster's shards with their slots, nodes with roles, health and
  // memory; the standalone pool's nodes.
  await page.getByRole('link', { name: 'Pools', exact: true }).click();
  await page.getByRole('heading', { level: 1, name: 'Engine pools' }).waitFor();
  const shards = page.getByRole('table', { name: 'Shards of cluster' });
  check((await shards.locator('tbody tr').count()) === 2, "the pools page lists the cluster's two shards");
  check(/0–8191/.test(await shards.innerText()) && /8192–16383/.test(await shards.innerText()), 'with their slot ranges');
  const clusterNodes = await page.getByRole('table', { name: 'Nodes of cluster' }).innerText();
  check(/primary/.test(clusterNodes) && /online/.test(clusterNodes) && /[0-9.]+ MB/.test(clusterNodes),
    'the cluster\'s nodes show role, health and memory');
  // n0, n1, f0 (the node for LFU caches) and d0 (for a dedicated cache).
  check((await page.getByRole('table', { name: 'Nodes of main' }).locator('tbody tr').count()) === 4, 'the standalone pool lists its nodes');
  check(await page.getByRole('button', { name: 'Add a shard' }).isVisible(), 'an admin may add a shard to the cluster');
  await noStrayText(page, 'pools page');
  await page.screenshot({ path: join(shots, '05b-pools.png'), fullPage: true });
  clean(page, 'desktop session');
  await page.close();

  // ---- phone width
  const phone = await open({ width: 390, height: 844 });
  await login(phone.page, adminToken);
  await phone.page.getByRole('link', { name: cacheName }).first().click();
  await phone.page.locator('figure.chart svg path.line').first().waitFor();
  const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `at phone width the page does not scroll sideways (overflow ${overflow}px)`);
  await phone.page.screenshot({ path: join(shots, '06-phone-cache.png'), fullPage: true });
  await phone.page.getByRole('link', { name: 'Audit', exact: true }).click();
  await phone.page.getByText(/Chain verified/).waitFor();
  await phone.page.screenshot({ path: join(shots, '07-phone-audit.png'), fullPage: false });
  clean(phone.page, 'phone session');
  await phone.page.close();

  // ---- an auditor reads but sees no write controls
  const aud = await open({ width: 1280, height: 800 });
  await login(aud.page, auditorToken);
  check((await aud.page.getByText('auditor of').count()) === 1, 'the header says the auditor is logged in');
  check((await aud.page.getByRole('link', { name: otherCache }).count()) === 0, "the auditor does not see another account's cache");
  check(/^Accounts\s+1$/.test((await aud.page.locator('.card', { hasText: 'Accounts' }).innerText()).trim()), 'the auditor sees one account');
  check((await aud.page.getByRole('link', { name: 'Pools' }).count()) === 0, "an account's auditor is not shown the engine's pools");
  await aud.page.getByRole('link', { name: cacheName }).first().click();
  await aud.page.getByRole('heading', { level: 1, name: `Cache ${cacheName}` }).waitFor();
  check((await aud.page.getByRole('button', { name: /Mint/ }).count()) === 0, 'an auditor sees no mint button');
  check((await aud.page.getByRole('button', { name: 'Save limits' }).count()) === 0, 'an auditor cannot change limits');
  await aud.page.getByRole('link', { name: 'Users and tokens' }).click();
  await aud.page.getByRole('table', { name: 'Active tokens' }).waitFor();
  check((await aud.page.getByRole('button', { name: /Revoke|Mint|Delete|Create/ }).count()) === 0, 'an auditor sees no revoke, mint or create controls');
  await aud.page.screenshot({ path: join(shots, '08-auditor-tokens.png'), fullPage: true });
  clean(aud.page, 'auditor session');
  await aud.page.close();

  console.log('PORTAL E2E PASSED');
} catch (e) {
  for (const [i, p] of browser.pages().entries()) await p.screenshot({ path: join(shots, `failure-${i}.png`), fullPage: true }).catch(() => {});
  console.error(`PORTAL E2E FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.closeAndClean();
}
