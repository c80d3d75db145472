// The TypeScript side of `sync-bench firehose --compare-ts`: @atproto/sync's Firehose
// verifying the same recorded subscribeRepos frames atpdb replays.
//
//   node firehose.mjs --interop DIR --frames FILE --dids FILE --plc URL --commits N
//
// --interop    the directory whose node_modules holds the packages (crates/devnet/interop)
// --frames     the frames as recorded: u32 little-endian length, then the frame, repeated
// --dids       a JSON array of every DID the frames name, resolved before timing
// --plc        the devnet's PLC directory
// --commits    #commit frames in the file; the run ends when each was handled or rejected
//
// A WebSocket server on 127.0.0.1 replays the frames to `new Firehose({service, runner})`,
// which decodes each frame, validates it against the lexicon, resolves the signing key
// (from a warm MemoryCache) and checks the commit with `verifyProofs` (signature, and each
// op's path against the MST in the proof blocks), one partition per DID through a
// MemoryRunner, as an AppView does. Timing runs from the connection to the last commit.
//
// Prints one JSON line: {"commits", "ops", "errors", "seconds", "commits_per_second"}.
// Exit 0 when every commit was accepted, 1 otherwise.

import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
}
for (const name of ['interop', 'frames', 'dids', 'plc', 'commits']) {
  if (!args[name]) {
    process.stderr.write(`firehose.mjs: --${name} is required\n`)
    process.exit(2)
  }
}

// The packages live in the interop directory's node_modules, not beside this script.
const require = createRequire(join(args.interop, 'package.json'))
const load = async (name) => import(pathToFileURL(require.resolve(name)).href)
const { IdResolver, MemoryCache } = await load('@atproto/identity')
const { Firehose, MemoryRunner } = await load('@atproto/sync')
const ws = await load('ws')
const WebSocketServer = ws.WebSocketServer ?? ws.default.WebSocketServer

const log = (msg) => process.stderr.write(`firehose.mjs: ${msg}\n`)
const finish = (code, summary) => {
  process.stdout.write(JSON.stringify(summary) + '\n')
  process.exit(code)
}

// The frames, in order.
const file = readFileSync(args.frames)
const frames = []
for (let at = 0; at < file.length; ) {
  const len = file.readUInt32LE(at)
  frames.push(file.subarray(at + 4, at + 4 + len))
  at += 4 + len
}
const expected = Number(args.commits)

// Identities resolved up front: in steady state the key cache is warm. The default fetch
// refuses loopback addresses (SSRF protection), so a plain one is passed in.
const idResolver = new IdResolver({
  plcUrl: args.plc,
  didCache: new MemoryCache(),
  fetch: (input, init) => globalThis.fetch(input, init),
})
const dids = JSON.parse(readFileSync(args.dids, 'utf8'))
for (let i = 0; i < dids.length; i += 50) {
  await Promise.all(dids.slice(i, i + 50).map((did) => idResolver.did.resolveAtprotoKey(did)))
}
log(`${frames.length} frames, ${dids.length} identities resolved`)

const server = new WebSocketServer({ host: '127.0.0.1', port: 0 })
await new Promise((resolve) => server.once('listening', resolve))
const port = server.address().port

let started = 0
server.on('connection', (socket) => {
  started = performance.now()
  for (const frame of frames) socket.send(frame, { binary: true })
})

const seen = new Set()
let ops = 0
let errors = 0
let firstError = null
const check = () => {
  if (seen.size + errors < expected) return
  const seconds = (performance.now() - started) / 1000
  finish(errors === 0 && seen.size === expected ? 0 : 1, {
    commits: seen.size,
    ops,
    errors,
    first_error: firstError,
    seconds,
    commits_per_second: seen.size / seconds,
  })
}

const firehose = new Firehose({
  idResolver,
  service: `ws://127.0.0.1:${port}`,
  runner: new MemoryRunner({}),
  excludeIdentity: true,
  excludeAccount: true,
  handleEvent: (evt) => {
    if (evt.event === 'create' || evt.event === 'update' || evt.event === 'delete') {
      ops++
      seen.add(evt.seq)
      check()
    }
  },
  onError: (err) => {
    errors++
    if (!firstError) firstError = `${err.message}: ${err.cause?.message ?? ''}`
    check()
  },
})
setTimeout(() => {
  finish(1, { commits: seen.size, ops, errors, first_error: firstError ?? 'timed out after 600 s' })
}, 600_000).unref()
firehose.start()
