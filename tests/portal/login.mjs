// Directory (LDAP) login to the admin portal in headless Chromium. Run by tests/portal.rs:
//
//   node tests/portal/login.mjs <base url> <user> <password> <expected role text> <screenshot dir>
//
// A wrong password is refused with a message; the right one logs in with the role the
// directory's groups give. Exits non-zero on the first failure.

import { check, launch } from './browser.mjs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const [base, user, password, role, shots] = process.argv.slice(2);
if (!shots) {
  console.error('usage: login.mjs <base url> <user> <password> <expected role text> <screenshot dir>');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const browser = await launch();
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/portal/`);
  await page.getByRole('heading', { name: 'With your directory account' }).waitFor();
  await page.getByLabel('User name', { exact: true }).fill(user);
  await page.getByLabel('Password', { exact: true }).fill(`${password}-wrong`);
  await page.getByLabel('Password', { exact: true }).press('Enter');
  await page.getByText('Wrong user name or password.').waitFor();
  check(true, 'a wrong directory password is refused with a message');
  await page.screenshot({ path: join(shots, '09-login-refused.png') });
  await page.getByLabel('Password', { exact: true }).fill(password);
  await page.getByLabel('Password', { exact: true }).press('Enter');
  await page.getByRole('heading', { level: 1, name: 'Overview' }).waitFor();
  const who = await page.locator('#who-text').innerText();
  check(who.startsWith(role), `the directory user is logged in as ${who}`);
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByRole('heading', { level: 1, name: 'Log in to Shoal' }).waitFor();
  check(true, 'logging out returns to the login page');
  check(errors.length === 0, `no script errors (${errors.join('; ')})`);
  console.log('PORTAL LOGIN PASSED');
} catch (e) {
  for (const [i, p] of browser.pages().entries()) await p.screenshot({ path: join(shots, `login-failure-${i}.png`) }).catch(() => {});
  console.error(`PORTAL LOGIN FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.closeAndClean();
}
