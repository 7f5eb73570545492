// The Worker behind pgshift's local D1: Cloudflare's D1 REST endpoints on a local workerd.
//
//   POST /client/v4/accounts/{account_id}/d1/database/{database_id}/query   rows as objects
//   POST /client/v4/accounts/{account_id}/d1/database/{database_id}/raw     rows as arrays + columns
//
// Body: {"sql": "...", "params": [...]} or {"batch": [{"sql", "params"}, ...]} (a batch runs in one
// transaction, as on Cloudflare). Answer: Cloudflare's v4 envelope
//   {"result": [...one entry per statement...], "success": true, "errors": [], "messages": []}
// with each entry {"results": [...], "success": true, "meta": {...}} (/raw: "results" is
// {"columns": [...], "rows": [[...]]}). Failures use the same envelope with success false and
// errors [{"code", "message"}]: a SQL error is code 7500 with HTTP 400, as Cloudflare answers it.
//
// The SQL runs on workerd's own D1 (miniflare's d1Databases binding: the D1 storage object over
// SQLite). The binding's public methods drop the per-statement meta of a raw query, so the Worker
// speaks to the storage object through the binding's own transport (`fetcher`, the path the binding
// itself uses for every call: POST /query?resultsFormat=ROWS_AND_COLUMNS with [{sql, params}]).
//
// D1's documented statement limits (100 bound parameters, 100,000 bytes of SQL) are enforced here
// as on Cloudflare, so a client that does not split its batches fails locally too.

const MAX_PARAMS = 100;
const MAX_SQL_BYTES = 100_000;
const encoder = new TextEncoder();

function envelope(status, result, errors = []) {
  return Response.json(
    { result, success: errors.length === 0, errors, messages: [] },
    { status },
  );
}

function failure(status, code, message) {
  return envelope(status, null, [{ code, message }]);
}

function countParams(sql) {
  // Positional parameters outside string literals, identifiers and comments: ? and ?NNN.
  let count = 0;
  let highest = 0;
  for (let i = 0; i < sql.length; i++) {
    const c = sql[i];
    if (c === "'" || c === '"' || c === "`") {
      const end = sql.indexOf(c, i + 1);
      i = end < 0 ? sql.length : end;
    } else if (c === "[") {
      const end = sql.indexOf("]", i + 1);
      i = end < 0 ? sql.length : end;
    } else if (c === "-" && sql[i + 1] === "-") {
      const end = sql.indexOf("\n", i);
      i = end < 0 ? sql.length : end;
    } else if (c === "/" && sql[i + 1] === "*") {
      const end = sql.indexOf("*/", i + 2);
      i = end < 0 ? sql.length : end + 1;
    } else if (c === "?") {
      let j = i + 1;
      while (j < sql.length && sql[j] >= "0" && sql[j] <= "9") j++;
      if (j > i + 1) highest = Math.max(highest, Number(sql.slice(i + 1, j)));
      else count++;
      i = j - 1;
    }
  }
  return Math.max(count, highest);
}

function checkStatement(query, index) {
  if (query === null || typeof query !== "object" || typeof query.sql !== "string") {
    return `statement ${index}: expected an object with "sql" (a string) and optional "params" (an array)`;
  }
  if (query.params !== undefined && query.params !== null && !Array.isArray(query.params)) {
    return `statement ${index}: "params" must be an array`;
  }
  for (const value of query.params ?? []) {
    if (!(value === null || typeof value === "string" || typeof value === "number")) {
      return `statement ${index}: a parameter must be a string, a number or null (got ${JSON.stringify(value)})`;
    }
  }
  return null;
}

function limitError(query) {
  const bytes = encoder.encode(query.sql).length;
  if (bytes > MAX_SQL_BYTES) {
    return `statement too long: ${bytes} bytes (D1 allows ${MAX_SQL_BYTES}): SQLITE_TOOBIG`;
  }
  const params = countParams(query.sql);
  if (params > MAX_PARAMS || (query.params ?? []).length > MAX_PARAMS) {
    return `too many SQL variables: ${Math.max(params, (query.params ?? []).length)} (D1 allows ${MAX_PARAMS}): SQLITE_ERROR`;
  }
  return null;
}

async function run(env, binding, queries, raw) {
  const db = env[binding];
  const url = "http://d1/query?resultsFormat=" + (raw ? "ROWS_AND_COLUMNS" : "ARRAY_OF_OBJECTS");
  const response = await db.fetcher.fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(queries.map((q) => ({ sql: q.sql, params: q.params ?? [] }))),
  });
  const text = await response.text();
  let answer;
  try {
    answer = JSON.parse(text);
  } catch {
    return failure(500, 7500, `internal error: D1 answered ${response.status}: ${text.slice(0, 200)}`);
  }
  if (!Array.isArray(answer)) {
    const message = (answer && answer.error) || `D1 answered ${response.status}`;
    return failure(400, 7500, String(message).replace(/^D1_ERROR: /, ""));
  }
  const result = answer.map((r) => ({
    results: r.results ?? (raw ? { columns: [], rows: [] } : []),
    success: r.success !== false,
    meta: r.meta ?? {},
  }));
  return envelope(200, result);
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const match = url.pathname.match(
      /^\/client\/v4\/accounts\/([^/]+)\/d1\/database\/([^/]+)\/(query|raw)\/?$/,
    );
    if (!match) {
      return failure(404, 7003, `Could not route to ${url.pathname}, perhaps your object identifier is invalid?`);
    }
    if (request.method !== "POST") {
      return failure(405, 10405, `Method ${request.method} not allowed (use POST)`);
    }
    const auth = request.headers.get("authorization") ?? "";
    const bearer = auth.match(/^Bearer\s+(\S+)\s*$/i);
    if (!bearer) {
      return envelope(400, null, [{
        code: 6003,
        message: "Invalid request headers",
        error_chain: [{ code: 6111, message: "Invalid format for Authorization header" }],
      }]);
    }
    const [, account, database, kind] = match;
    if (bearer[1] !== env.API_TOKEN || account !== env.ACCOUNT_ID) {
      return failure(403, 10000, "Authentication error");
    }
    const binding = JSON.parse(env.DATABASES)[database];
    if (binding === undefined) {
      return failure(404, 7404, `The database ${database} could not be found`);
    }
    let body;
    try {
      body = await request.json();
    } catch (e) {
      return failure(400, 7400, `The request is malformed: the body is not JSON (${e.message})`);
    }
    const queries = body && Array.isArray(body.batch) ? body.batch : [body];
    if (queries.length === 0) {
      return failure(400, 7400, "The request is malformed: batch is empty");
    }
    for (let i = 0; i < queries.length; i++) {
      const problem = checkStatement(queries[i], i);
      if (problem) return failure(400, 7400, `The request is malformed: ${problem}`);
    }
    for (const query of queries) {
      const problem = limitError(query);
      if (problem) return failure(400, 7500, problem);
    }
    return run(env, binding, queries, kind === "raw");
  },
};
