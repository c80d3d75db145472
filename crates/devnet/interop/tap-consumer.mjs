// A consumer built the way the @atproto/tap README says to build one (Tap + SimpleIndexer),
// pointed at `atpdb serve`. It keeps, per repo, the records (path -> cid), the handle and the
// status it was told about, and answers commands from stdin (one JSON object a line):
//   {"cmd":"add","dids":[...]}     tap.addRepos
//   {"cmd":"info","did":"..."}     tap.getRepoInfo
//   {"cmd":"resolve","did":"..."}  tap.resolveDid (null on 404)
//   {"cmd":"dump"}                 the state rebuilt so far
//   {"cmd":"stop"}                 channel.destroy(), then exit
// Each answer is one JSON line on stdout. Usage: node tap-consumer.mjs <base-url>
import { createInterface } from 'node:readline'
import { Tap, SimpleIndexer } from '@atproto/tap'

const base = process.argv[2]
const tap = new Tap(base, { adminPassword: process.env.TAP_ADMIN_PASSWORD || undefined })
const repos = new Map()
const counts = { records: 0, identities: 0, live: 0, historical: 0, errors: 0, lastId: 0, duplicates: 0 }
const seen = new Set()
const errors = []

const repo = (did) => {
  let entry = repos.get(did)
  if (!entry) {
    entry = { records: {}, handle: null, status: null }
    repos.set(did, entry)
  }
  return entry
}

const indexer = new SimpleIndexer()
  .record(async (evt) => {
    if (seen.has(evt.id)) counts.duplicates++
    seen.add(evt.id)
    counts.records++
    counts.lastId = Math.max(counts.lastId, evt.id)
    if (evt.live) counts.live++
    else counts.historical++
    const records = repo(evt.did).records
    const path = `${evt.collection}/${evt.rkey}`
    if (evt.action === 'delete') delete records[path]
    else records[path] = evt.cid
  })
  .identity(async (evt) => {
    if (seen.has(evt.id)) counts.duplicates++
    seen.add(evt.id)
    counts.identities++
    counts.lastId = Math.max(counts.lastId, evt.id)
    const entry = repo(evt.did)
    entry.handle = evt.handle
    entry.status = evt.status
    if (evt.status === 'deleted') entry.records = {}
  })
  .error((err) => {
    counts.errors++
    if (errors.length < 20) errors.push(String(err?.cause ?? err))
  })

const channel = tap.channel(indexer, { maxReconnectSeconds: 1 })
const running = channel.start().then(
  () => ({ ended: 'clean' }),
  (err) => ({ ended: 'error', error: String(err) }),
)
let ended = null
running.then((result) => {
  ended = result
})
const say = (value) => process.stdout.write(JSON.stringify(value) + '\n')

const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  if (!line.trim()) continue
  const command = JSON.parse(line)
  try {
    switch (command.cmd) {
      case 'add':
        await tap.addRepos(command.dids)
        say({ added: command.dids.length })
        break
      case 'info':
        say({ info: await tap.getRepoInfo(command.did) })
        break
      case 'resolve':
        say({ resolve: await tap.resolveDid(command.did) })
        break
      case 'dump':
        say({ dump: Object.fromEntries(repos), counts, errors, ended })
        break
      case 'stop':
        await channel.destroy()
        say({ stopped: await running })
        process.exit(0)
      default:
        say({ failed: `unknown command ${command.cmd}` })
    }
  } catch (err) {
    say({ failed: String(err) })
  }
}
