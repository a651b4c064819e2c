// One session through openapi-fetch, typed by what openapi-typescript generates from openapi.yaml.
//
// tests/test_clients.py generates agent-runner.d.ts beside a copy of this file, compiles both with
// `tsc --strict` (tsconfig.json here, with the example in docs/clients.md) and runs the result under node against a live server:
// AGENT_RUNNER_URL says where, API_TOKEN (optional) the token the server wants. It prints one JSON
// line with what it did, or exits non-zero with the first thing that was not as the spec says.
import assert from "node:assert/strict";

import createClient from "openapi-fetch";
import type { components, paths } from "./agent-runner.js";
import { readEvents, type StreamEvent } from "./documented_stream.mjs"; // the reader on docs/clients.md

type Run = components["schemas"]["Run"];

const BUSY = "An agent is already running, please retry later";
const TERMINAL: readonly Run["state"][] = ["DONE", "ERROR", "CANCELLED"];

function fail(what: string): never {
  throw new Error(`flow.mts: ${what}`);
}

function expectStatus(response: Response, status: number, body: unknown): void {
  if (response.status !== status) fail(`expected ${status}, got ${response.status}: ${JSON.stringify(body)}`);
}

const baseUrl = process.env.AGENT_RUNNER_URL ?? fail("AGENT_RUNNER_URL is not set");
const token = process.env.API_TOKEN;
if (token) {
  const { response } = await createClient<paths>({ baseUrl }).GET("/agents");
  expectStatus(response, 401, "the server does want the token");
}
const client = createClient<paths>({ baseUrl, headers: token ? { Authorization: `Bearer ${token}` } : {} });

async function start(body: components["schemas"]["RunRequest"]): Promise<string> {
  const { data, error, response } = await client.POST("/agents/run", { body });
  expectStatus(response, 202, error);
  if (data?.state !== "PENDING" || response.headers.get("location") !== `/agents/status/${data.run_id}`) {
    fail(`start: ${JSON.stringify(data)} with location ${response.headers.get("location")}`);
  }
  return data.run_id;
}

async function waitUntilFinished(runId: string): Promise<Run> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const { data, error, response } = await client.GET("/agents/status/{run_id}", {
      params: { path: { run_id: runId }, query: { wait: 5 } },
    });
    expectStatus(response, 200, error);
    if (data && TERMINAL.includes(data.state)) return data;
  }
  return fail(`run ${runId} did not finish in 30 s`);
}

const user = crypto.randomUUID();

const agents = await client.GET("/agents");
expectStatus(agents.response, 200, agents.error);
if (!agents.data?.agents.some((agent) => agent.agent_type === "sleeper")) fail(`agents: ${JSON.stringify(agents.data)}`);

const given = { seconds: 0.5, note: "typescript" };
const first = await start({ agent_type: "sleeper", user_id: user, input: given });
const busy = await client.POST("/agents/run", { body: { agent_type: "sleeper", user_id: user } });
expectStatus(busy.response, 409, busy.data);
if (busy.error?.detail !== BUSY || !(Number(busy.response.headers.get("retry-after")) >= 1)) {
  fail(`busy: ${JSON.stringify(busy.error)} with retry-after ${busy.response.headers.get("retry-after")}`);
}

const run = await waitUntilFinished(first);
assert.deepEqual({ state: run.state, error: run.error, input: run.input, result: run.result },
                 { state: "DONE", error: null, input: given, result: { slept: 0.5, input: given } });
if (!(run.started_at && run.finished_at && run.created_at <= run.started_at && run.started_at <= run.finished_at)) {
  fail(`first run times: ${run.created_at} ${run.started_at} ${run.finished_at}`);
}

async function streamed(runId: string, lastEventId?: string): Promise<StreamEvent[]> {
  const { data, response } = await client.GET("/agents/events/{run_id}", {
    params: { path: { run_id: runId }, header: lastEventId ? { "Last-Event-ID": lastEventId } : {} },
    parseAs: "stream",
  });
  if (response.status !== 200 && response.status !== 204) fail(`stream of ${runId}: ${response.status}`);
  const events: StreamEvent[] = [];
  for await (const event of readEvents(data)) events.push(event);
  return events;
}

const second = await start({ agent_type: "sleeper", user_id: user }); // no input: the agent gets {}
const live = await streamed(second); // read while it runs, to its terminal event
const liveRuns = live.flatMap((event) => (event.event === "run" ? [event.data] : []));
const states = liveRuns.map((item) => item.state);
if (live[0]?.event !== "run" || states.at(-1) !== "DONE" || states.filter((s) => TERMINAL.includes(s)).length !== 1 ||
    live.some((event) => event.event === "gap")) {
  fail(`second run's stream: ${JSON.stringify(live)}`);
}
assert.deepEqual(liveRuns.at(-1)?.input, {});
const history = await streamed(first); // a finished run: its whole history, once
if (history.flatMap((event) => (event.event === "run" ? [event.data.state] : [])).at(-1) !== "DONE" ||
    history.some((event) => event.event === "log" && event.data.run_id !== first)) {
  fail(`first run's stream: ${JSON.stringify(history)}`);
}
const lastId = live.at(-1)?.event === "run" ? (live.at(-1) as components["schemas"]["RunEvent"]).id : undefined;
assert.deepEqual(await streamed(second, lastId), []); // a resume after the terminal event: 204, nothing

const listed = await client.GET("/agents/runs", { params: { query: { state: "DONE", user_id: user, limit: 10 } } });
expectStatus(listed.response, 200, listed.error);
assert.deepEqual(listed.data?.runs.map((item) => item.run_id), [second, first]);

const cancel = await client.POST("/agents/cancel/{run_id}", { params: { path: { run_id: first } } });
expectStatus(cancel.response, 409, cancel.data);
if (cancel.error?.detail !== `Run ${first} already finished (DONE)`) fail(`cancel: ${JSON.stringify(cancel.error)}`);

const unknown = await client.POST("/agents/run", { body: { agent_type: "no-such-agent", user_id: user } });
expectStatus(unknown.response, 400, unknown.data);
if (!unknown.error?.detail.includes("no-such-agent")) fail(`unknown agent: ${JSON.stringify(unknown.error)}`);

console.log(JSON.stringify({ user_id: user, runs: [first, second], streamed: states }));
