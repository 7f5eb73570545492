#!/usr/bin/env node
// pgshift's local D1: Cloudflare's D1 REST API (/query, /raw) on 127.0.0.1, served by workerd's own
// D1 through miniflare. For tests and `pgshift demo`; nothing here talks to Cloudflare.
//
//   node server.mjs [--port 0] [--host 127.0.0.1] [--persist DIR] [--account ID]
//                   [--database ID[,ID...]] [--token TOKEN]
//
// --port 0 picks a free port. Once serving, one line goes to stdout:
//   {"url": "http://127.0.0.1:PORT/client/v4", "port": PORT, "account_id": ..., "database_ids": [...]}
// --persist keeps the databases (SQLite files) in DIR across restarts; without it they live in memory.
// The token may also come from $D1LOCAL_TOKEN (default "d1local-token"). SIGINT/SIGTERM stop it.

import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Log, LogLevel, Miniflare } from "miniflare";

const here = dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const options = {
    port: 0,
    host: "127.0.0.1",
    persist: null,
    account: "d1local-account",
    databases: ["00000000-0000-4000-8000-000000000001"],
    token: process.env.D1LOCAL_TOKEN || "d1local-token",
  };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${name} needs a value`);
    i++;
    if (name === "--port") options.port = Number(value);
    else if (name === "--host") options.host = value;
    else if (name === "--persist") options.persist = resolve(value);
    else if (name === "--account") options.account = value;
    else if (name === "--database") options.databases = value.split(",").filter(Boolean);
    else if (name === "--token") options.token = value;
    else throw new Error(`unknown option ${name}`);
  }
  if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) {
    throw new Error("--port must be 0-65535");
  }
  if (options.databases.length === 0) throw new Error("--database names no database");
  return options;
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`d1local: ${e.message}\n`);
    process.exit(2);
  }
  const d1Databases = {};
  const bindings = {};
  options.databases.forEach((id, i) => {
    d1Databases[`D1_${i}`] = id;
    bindings[id] = `D1_${i}`;
  });
  const mf = new Miniflare({
    modules: true,
    script: readFileSync(join(here, "worker.mjs"), "utf8"),
    scriptPath: join(here, "worker.mjs"),
    compatibilityDate: "2026-04-01",
    host: options.host,
    port: options.port,
    cf: false, // no download of the request.cf data: this server runs offline
    d1Databases,
    d1Persist: options.persist ?? false,
    bindings: {
      ACCOUNT_ID: options.account,
      API_TOKEN: options.token,
      DATABASES: JSON.stringify(bindings),
    },
    log: new Log(LogLevel.WARN),
  });
  const url = await mf.ready;
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    try {
      await mf.dispose();
    } finally {
      process.exit(0);
    }
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
  const base = new URL("/client/v4", url).href;
  process.stdout.write(
    JSON.stringify({
      url: base,
      port: Number(url.port),
      account_id: options.account,
      database_ids: options.databases,
    }) + "\n",
  );
}

main().catch((e) => {
  process.stderr.write(`d1local: ${e.stack || e}\n`);
  process.exit(1);
});
