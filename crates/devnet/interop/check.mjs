// Cross-implementation check: the reference TypeScript AT Protocol packages
// (@atproto/repo, @atproto/sync, @atproto/identity, @atproto/api) against a
// running atpdb-devnet on loopback.
//
//   node check.mjs '<ready-json>'      (or: node check.mjs @path/to/ready.json)
//
// ready-json: {"plc": "http://127.0.0.1:P", "relay": "http://127.0.0.1:Q",
//              "pds": ["http://127.0.0.1:R", ...],
//              "accounts": [{"did": "...", "pds": "http://..."}, ...]}
// "accounts" may also list bare DIDs, or be just the number of seeded accounts.
// Optional keys (anything else is ignored):
//   expect_commits     commits the relay firehose must deliver and verify (default 50)
//   firehose_cursor    cursor for the first subscribeRepos dial (default 0: replay the window)
//   min_records        records every listed account must hold (default 1)
//   list_repos_limit   page size for listRepos, small to exercise paging (default 2)
//   require_prev_data  commits with since != null must carry prevData (default true)
//   expect_live        the firehose must also carry the agent's last write (default true)
//   timeout_secs       whole-run deadline (default 55)
//   skip               list of section or step names to skip, e.g. ["agent", "refreshSession"]
//
// Prints progress on stderr and one JSON summary line on stdout. Exit 0 when
// everything was accepted, 1 with the failing step otherwise, 2 on bad usage.

import { readFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'

import { AtpAgent, XRPCError } from '@atproto/api'
import { sha256 } from '@atproto/crypto'
import { IdResolver } from '@atproto/identity'
import {
  MemoryBlockstore,
  MST,
  def as repoDef,
  readCarWithRoot,
  verifyCommitSig,
  verifyRepoCar,
} from '@atproto/repo'
import { Firehose } from '@atproto/sync'

const T0 = Date.now()
const log = (msg) => process.stderr.write(`interop [${((Date.now() - T0) / 1000).toFixed(1)}s]: ${msg}\n`)

class StepError extends Error {
  constructor(step, message, cause) {
    super(message, cause ? { cause } : undefined)
    this.step = step
  }
}

const describeErr = (err) => {
  if (!err) return String(err)
  let s = err instanceof XRPCError
    ? `XRPCError status=${err.status} error=${err.error ?? '-'} message=${err.message}`
    : `${err.name ?? 'Error'}: ${err.message ?? String(err)}`
  let cause = err.cause
  for (let depth = 0; cause && depth < 4; depth++) {
    s += ` <- ${cause.name ?? 'Error'}: ${cause.message ?? String(cause)}`
    cause = cause.cause
  }
  return s
}

// Runs one named step; any exception becomes a StepError naming that step.
const step = async (name, fn) => {
  try {
    return await fn()
  } catch (err) {
    if (err instanceof StepError) throw err
    throw new StepError(name, describeErr(err), err)
  }
}

const ensure = (cond, stepName, message) => {
  if (!cond) throw new StepError(stepName, message)
}

const finish = (code, summary) => {
  process.stdout.write(JSON.stringify(summary) + '\n')
  // undici keep-alive sockets and ws timers would otherwise hold the loop open.
  process.exit(code)
}

// ---------------------------------------------------------------- arguments

const usage = () => {
  process.stderr.write("usage: node check.mjs '<ready-json>' | @ready.json\n")
  finish(2, { ok: false, step: 'args', error: 'bad usage' })
}

let ready
{
  const arg = process.argv[2]
  if (!arg) usage()
  try {
    ready = JSON.parse(arg.startsWith('@') ? readFileSync(arg.slice(1), 'utf8') : arg)
  } catch (err) {
    process.stderr.write(`interop: ready-json does not parse: ${err.message}\n`)
    usage()
  }
  const httpUrl = (u) => typeof u === 'string' && /^https?:\/\/[^/]+/.test(u)
  const problems = []
  if (!httpUrl(ready?.plc)) problems.push('"plc" must be an http(s) URL')
  if (!httpUrl(ready?.relay)) problems.push('"relay" must be an http(s) URL')
  if (!Array.isArray(ready?.pds) || ready.pds.length === 0 || !ready.pds.every(httpUrl)) {
    problems.push('"pds" must be a non-empty list of http(s) URLs')
  }
  if (ready?.accounts !== undefined && !Array.isArray(ready.accounts) && !Number.isInteger(ready.accounts)) {
    problems.push('"accounts" must be a list of {did, pds} (or DIDs), or a count')
  }
  if (problems.length) {
    process.stderr.write(`interop: bad ready-json: ${problems.join('; ')}\n`)
    usage()
  }
}

const trimSlash = (u) => u.replace(/\/+$/, '')
const PLC = trimSlash(ready.plc)
const RELAY = trimSlash(ready.relay)
const PDS = ready.pds.map(trimSlash)
// "accounts": a list of {did, pds} or of DIDs; or just how many were seeded.
const ACCOUNTS = (Array.isArray(ready.accounts) ? ready.accounts : [])
  .map((a) => (typeof a === 'string' ? { did: a } : { ...a, pds: typeof a.pds === 'string' ? trimSlash(a.pds) : undefined }))
const SEEDED_COUNT = Number.isInteger(ready.accounts) ? ready.accounts : ACCOUNTS.length
const EXPECT_COMMITS = Number.isInteger(ready.expect_commits) ? ready.expect_commits : 50
const FIREHOSE_CURSOR = Number.isInteger(ready.firehose_cursor) ? ready.firehose_cursor : 0
const MIN_RECORDS = Number.isInteger(ready.min_records) ? ready.min_records : 1
const LIST_LIMIT = Number.isInteger(ready.list_repos_limit) ? ready.list_repos_limit : 2
const REQUIRE_PREV_DATA = ready.require_prev_data !== false
const EXPECT_LIVE = ready.expect_live !== false
const TIMEOUT_MS = 1000 * (typeof ready.timeout_secs === 'number' ? ready.timeout_secs : 55)
const SKIP = new Set(Array.isArray(ready.skip) ? ready.skip : [])
const REQUEST_TIMEOUT_MS = 10_000

const summary = { ok: false, node: process.version, repos: null, firehose: null, agent: null }

// Whole-run deadline: whatever is still pending is the failing step.
let currentStep = 'startup'
const deadline = setTimeout(() => {
  log(`FAILED: deadline of ${TIMEOUT_MS / 1000}s passed during "${currentStep}"`)
  finish(1, { ...summary, ok: false, step: currentStep, error: `timeout after ${TIMEOUT_MS / 1000}s` })
}, TIMEOUT_MS)
deadline.unref?.()

// fetch with a per-request timeout. The identity package's default fetch
// refuses http:, IP-literal hosts, custom ports and private addresses (SSRF
// protection), so loopback needs a plain fetch passed in explicitly.
const timedFetch = (input, init) => {
  const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_MS)
  const signal = init?.signal ? AbortSignal.any([init.signal, timeout]) : timeout
  return globalThis.fetch(input, { ...(init ?? {}), signal })
}

const idResolver = new IdResolver({ plcUrl: PLC, timeout: 5000, fetch: timedFetch })

// did -> did:key, cached for our own checks (the Firehose resolves on its own).
const keyCache = new Map()
const resolveKey = async (did, refresh = false) => {
  if (!refresh && keyCache.has(did)) return keyCache.get(did)
  const key = await idResolver.did.resolveAtprotoKey(did, refresh)
  keyCache.set(did, key)
  return key
}

// ------------------------------------------------- (a) every repo verifies

const TID_RE = /^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$/

// Rebuilds the tree from the repo's leaves with the reference MST and requires
// the same root: the only check here of key layers and node layout.
const checkCanonical = async (carBytes, verified) => {
  if (!TID_RE.test(verified.commit.rev)) throw new Error(`commit rev "${verified.commit.rev}" is not a TID`)
  const car = await readCarWithRoot(carBytes)
  const commit = await new MemoryBlockstore(car.blocks).readObj(car.root, repoDef.commit)
  let mst = await MST.create(new MemoryBlockstore())
  for (const c of verified.creates) mst = await mst.add(`${c.collection}/${c.rkey}`, c.cid)
  const root = await mst.getPointer()
  if (!root.equals(commit.data)) {
    throw new Error(`commit data ${commit.data} but the canonical MST of the same ${verified.creates.length} records is ${root}`)
  }
}

const checkRepos = async () => {
  const out = { hosts: [], repos: 0, records: 0 }
  const seen = new Map() // did -> { pds, records }
  for (const pds of PDS) {
    currentStep = `repos:listRepos ${pds}`
    const agent = new AtpAgent({ service: pds, fetch: timedFetch })
    const listed = []
    const cursors = new Set()
    let cursor
    let pages = 0
    for (;;) {
      const res = await step(`repos:listRepos ${pds}`, () =>
        agent.com.atproto.sync.listRepos({ limit: LIST_LIMIT, cursor }))
      pages++
      ensure(res.data.repos.length <= LIST_LIMIT, `repos:listRepos ${pds}`,
        `page of ${res.data.repos.length} repos exceeds limit=${LIST_LIMIT}`)
      listed.push(...res.data.repos)
      cursor = res.data.cursor
      if (cursor === undefined || res.data.repos.length === 0) break
      ensure(!cursors.has(cursor), `repos:listRepos ${pds}`, `cursor "${cursor}" repeated: paging does not advance`)
      cursors.add(cursor)
      ensure(pages < 10_000, `repos:listRepos ${pds}`, 'more than 10000 pages')
    }
    const dids = new Set()
    for (const r of listed) {
      ensure(!dids.has(r.did), `repos:listRepos ${pds}`, `${r.did} listed twice across pages`)
      dids.add(r.did)
    }
    log(`${pds}: listRepos gave ${listed.length} repos in ${pages} page(s)`)

    const active = listed.filter((r) => r.active !== false)
    let next = 0
    const worker = async () => {
      while (next < active.length) {
        const repo = active[next++]
        const name = `repos:getRepo ${repo.did}`
        currentStep = name
        const key = await step(`${name} (resolve signing key from PLC)`, () => resolveKey(repo.did))
        const atp = await step(`${name} (resolve DID document)`, () => idResolver.did.resolveAtprotoData(repo.did))
        ensure(trimSlash(atp.pds) === pds, name,
          `DID document names PDS ${atp.pds} but listRepos on ${pds} lists the repo`)
        const res = await step(name, () => agent.com.atproto.sync.getRepo({ did: repo.did }))
        const ctype = res.headers['content-type'] ?? ''
        ensure(ctype.startsWith('application/vnd.ipld.car'), name, `content-type is "${ctype}", want application/vnd.ipld.car`)
        ensure(res.data instanceof Uint8Array, name, 'getRepo body was not returned as bytes')
        const verified = await step(`${name} (verifyRepoCar)`, () => verifyRepoCar(res.data, repo.did, key))
        // verifyRepoCar walks whatever tree it is given: it accepts a
        // non-canonical MST (wrong layers, unsorted keys) and any rev string.
        await step(`${name} (canonical MST)`, () => checkCanonical(res.data, verified))
        ensure(verified.commit.rev >= repo.rev, name,
          `getRepo commit rev ${verified.commit.rev} is older than listRepos rev ${repo.rev}`)
        if (verified.commit.rev === repo.rev) {
          ensure(verified.commit.cid.toString() === repo.head, name,
            `listRepos head ${repo.head} but getRepo root is ${verified.commit.cid} at the same rev`)
        }
        seen.set(repo.did, { pds, records: verified.creates.length })
        out.repos++
        out.records += verified.creates.length
      }
    }
    await Promise.all([worker(), worker(), worker(), worker()])
    out.hosts.push({ pds, listed: listed.length, pages, verified: active.length })
  }
  for (const acc of ACCOUNTS) {
    const got = seen.get(acc.did)
    ensure(got, 'repos:accounts', `account ${acc.did} from ready-json was not found by listRepos on any PDS`)
    if (acc.pds) {
      ensure(got.pds === acc.pds, 'repos:accounts', `account ${acc.did} expected on ${acc.pds}, listed by ${got.pds}`)
    }
    ensure(got.records >= MIN_RECORDS, 'repos:accounts',
      `account ${acc.did} holds ${got.records} records, want >= ${MIN_RECORDS}`)
  }
  const holding = [...seen.values()].filter((r) => r.records >= MIN_RECORDS).length
  ensure(holding >= SEEDED_COUNT, 'repos:accounts',
    `${SEEDED_COUNT} seeded accounts expected, but only ${holding} listed repos hold >= ${MIN_RECORDS} records`)
  log(`repos: ${out.repos} repos with ${out.records} records verified by verifyRepoCar`)
  return out
}

// -------------------------------------------- (b) the relay firehose verifies

const COMMIT_T = 'com.atproto.sync.subscribeRepos#commit'
const INFO_T = 'com.atproto.sync.subscribeRepos#info'
const VALID_ACCOUNT_STATUS = ['takendown', 'suspended', 'deleted', 'deactivated']

// Our own checks on top of the reference consumer, built from @atproto/repo
// primitives: commit block, signature, rev/since/prevData chain, and MST
// inversion (the Firehose class itself only checks each op's inclusion proof).
const strictCommitCheck = async (evt, chain) => {
  const car = await readCarWithRoot(evt.blocks) // also checks every block's CID against its bytes
  if (!car.root.equals(evt.commit)) throw new Error(`blocks CAR root ${car.root} != commit ${evt.commit}`)
  const store = new MemoryBlockstore(car.blocks)
  const commit = await store.readObj(car.root, repoDef.commit)
  if (commit.did !== evt.repo) throw new Error(`commit block did ${commit.did} != repo ${evt.repo}`)
  if (commit.rev !== evt.rev) throw new Error(`commit block rev ${commit.rev} != event rev ${evt.rev}`)
  let key = await resolveKey(evt.repo)
  if (!(await verifyCommitSig(commit, key))) {
    key = await resolveKey(evt.repo, true)
    if (!(await verifyCommitSig(commit, key))) throw new Error(`bad commit signature for key ${key}`)
  }
  if (evt.tooBig) throw new Error('tooBig=true (deprecated; a sync 1.1 relay sends #sync instead)')
  if (evt.rebase) throw new Error('rebase=true (deprecated)')
  const prev = chain.get(evt.repo)
  if (prev) {
    if (!(evt.rev > prev.rev)) throw new Error(`rev ${evt.rev} does not increase past ${prev.rev}`)
    if (evt.since !== prev.rev) throw new Error(`since=${evt.since} but the previous commit had rev ${prev.rev}`)
    if (evt.prevData && !evt.prevData.equals(prev.data)) {
      throw new Error(`prevData ${evt.prevData} != previous commit's data ${prev.data}`)
    }
  }
  let inverted = false
  if (evt.prevData) {
    let mst = MST.load(store, commit.data)
    for (const op of evt.ops) {
      const found = await mst.get(op.path)
      if (op.action === 'create') {
        if (!found || !op.cid || !found.equals(op.cid)) throw new Error(`create ${op.path}: tree has ${found}, op says ${op.cid}`)
        mst = await mst.delete(op.path)
      } else if (op.action === 'update') {
        if (!found || !op.cid || !found.equals(op.cid)) throw new Error(`update ${op.path}: tree has ${found}, op says ${op.cid}`)
        if (!op.prev) throw new Error(`update ${op.path} has no prev: cannot invert`)
        mst = await mst.update(op.path, op.prev)
      } else if (op.action === 'delete') {
        if (found) throw new Error(`delete ${op.path}: tree still holds ${found}`)
        if (!op.prev) throw new Error(`delete ${op.path} has no prev: cannot invert`)
        mst = await mst.add(op.path, op.prev)
      } else {
        throw new Error(`unknown op action "${op.action}"`)
      }
    }
    const root = await mst.getPointer()
    if (!root.equals(evt.prevData)) throw new Error(`MST inversion gave ${root}, prevData is ${evt.prevData}`)
    inverted = true
  } else if (REQUIRE_PREV_DATA && evt.since !== null) {
    throw new Error('prevData missing on a commit with since != null (sync 1.1 needs it for inversion)')
  }
  chain.set(evt.repo, { rev: evt.rev, data: commit.data })
  return { inverted }
}

const runFirehose = () => {
  const stats = {
    dials: 0, commits: 0, verified: 0, inverted: 0, ops: 0, opsDelivered: 0,
    identity: 0, account: 0, sync: 0, info: [], firstSeq: null, lastSeq: null,
  }
  const chain = new Map()
  const lastRevByDid = new Map()
  let live = null // { did, rev } once the agent has written
  let failure = null
  let stopped = false
  let lastDialError = null
  let rejectFailed
  const failed = new Promise((_, reject) => { rejectFailed = reject })
  failed.catch(() => {}) // observed through wait() / failed()
  const fail = (stepName, message, cause) => {
    if (failure || stopped) return
    failure = new StepError(stepName, message, cause)
    rejectFailed(failure)
  }
  const satisfied = () => stats.verified >= EXPECT_COMMITS &&
    (!live || (lastRevByDid.get(live.did) ?? '') >= live.rev)

  class CheckedFirehose extends Firehose {
    // parseEvt is where the reference consumer validates and authenticates an
    // event; wrapping it lets us see the raw event next to what it accepted.
    async parseEvt(evt) {
      if (typeof evt.seq === 'number') {
        if (stats.lastSeq !== null && evt.seq <= stats.lastSeq) {
          fail('firehose:seq', `seq ${evt.seq} after ${stats.lastSeq}: not strictly increasing`)
        }
        stats.firstSeq ??= evt.seq
        stats.lastSeq = evt.seq
      }
      const out = await super.parseEvt(evt)
      if (evt.$type === COMMIT_T) {
        stats.commits++
        stats.ops += evt.ops.length
        if (out.length !== evt.ops.length) {
          fail('firehose:commit', `seq ${evt.seq} (${evt.repo} rev ${evt.rev}): the reference consumer accepted ` +
            `${out.length} of ${evt.ops.length} ops (an op whose inclusion proof or record block is missing is dropped)`)
          return out
        }
        try {
          const { inverted } = await strictCommitCheck(evt, chain)
          if (inverted) stats.inverted++
        } catch (err) {
          fail('firehose:commit', `seq ${evt.seq} (${evt.repo} rev ${evt.rev}): ${describeErr(err)}`, err)
          return out
        }
        stats.verified++
        lastRevByDid.set(evt.repo, evt.rev)
      } else if (evt.$type === INFO_T) {
        stats.info.push(`${evt.name}${evt.message ? ': ' + evt.message : ''}`)
        log(`firehose #info ${evt.name} ${evt.message ?? ''}`)
      } else if (evt.$type?.endsWith('#identity')) {
        stats.identity++
      } else if (evt.$type?.endsWith('#account')) {
        stats.account++
        if (evt.status && !VALID_ACCOUNT_STATUS.includes(evt.status)) {
          log(`firehose: #account ${evt.did} status "${evt.status}" is dropped by the reference consumer`)
        }
      } else if (evt.$type?.endsWith('#sync')) {
        stats.sync++
      }
      return out
    }
  }

  const wsBase = RELAY.replace(/^http/, 'ws')
  const firehose = new CheckedFirehose({
    service: wsBase,
    idResolver,
    unauthenticatedHandles: true, // devnet handles do not resolve through DNS / https
    unauthenticatedCommits: false,
    subscriptionReconnectDelay: 1000,
    maxReconnectSeconds: 2,
    // Called on every (re)dial: the first dial replays from FIREHOSE_CURSOR, a
    // re-dial resumes after the last seq seen. One re-dial is tolerated; more
    // means the relay keeps refusing or dropping the connection.
    getCursor: () => {
      stats.dials++
      if (stats.dials > 1) {
        log(`firehose: re-dialing (dial ${stats.dials}) with cursor ${stats.lastSeq ?? FIREHOSE_CURSOR}` +
          (lastDialError ? ` after: ${lastDialError}` : ''))
        if (stats.dials > 2) {
          fail('firehose:connect', `relay connection failed or dropped ${stats.dials - 1} times` +
            (lastDialError ? `; last error: ${lastDialError}` : ''))
        }
      }
      return stats.lastSeq ?? FIREHOSE_CURSOR
    },
    handleEvent: async (evt) => {
      if (evt.event === 'create' || evt.event === 'update' || evt.event === 'delete') stats.opsDelivered++
    },
    onError: (err) => fail('firehose', describeErr(err), err),
  })
  // The Firehose does not forward the socket-level reconnect reason; the
  // Subscription it wraps reads this hook from its options object.
  if (firehose.sub?.opts) firehose.sub.opts.onReconnectError = (err) => { lastDialError = describeErr(err) }
  firehose.start().then(
    () => fail('firehose:connect', 'the relay ended the stream (normal close) before the check was done'),
    (err) => fail('firehose', describeErr(err), err))
  log(`firehose: subscribing to ${wsBase}/xrpc/com.atproto.sync.subscribeRepos?cursor=${FIREHOSE_CURSOR}`)

  return {
    stats,
    expectLive: (did, rev) => { live = { did, rev } },
    failed: () => failed,
    wait: () => Promise.race([failed, new Promise((resolve) => {
      const iv = setInterval(() => { if (satisfied()) { clearInterval(iv); resolve() } }, 50)
    })]),
    stop: async () => {
      stopped = true
      await Promise.race([firehose.destroy(), new Promise((r) => setTimeout(r, 2000))])
    },
    describe: () => `${stats.verified}/${EXPECT_COMMITS} commits verified` +
      (live ? `, live write ${live.did}@${live.rev} ${(lastRevByDid.get(live.did) ?? '') >= live.rev ? 'seen' : 'not yet seen'}` : '') +
      `, ${stats.dials} dial(s), last seq ${stats.lastSeq}`,
  }
}

// ----------------------------------------- (c) AtpAgent against the first PDS

// A 1x1 PNG.
const PNG = Uint8Array.from(Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==', 'base64'))

// A TID record key (app.bsky.feed.post requires one): 53 bits of microseconds
// then 10 bits of clock id, base32-sortable.
const S32 = '234567abcdefghijklmnopqrstuvwxyz'
const makeTid = () => {
  let v = (BigInt(Date.now()) * 1000n << 10n) | BigInt(Math.floor(Math.random() * 1024))
  let out = ''
  for (let i = 0; i < 13; i++) { out = S32[Number(v & 31n)] + out; v >>= 5n }
  return out
}

const runAgent = async () => {
  const pds = PDS[0]
  const out = { pds, steps: [] }
  const agent = new AtpAgent({ service: pds, fetch: timedFetch })
  const s = async (name, fn) => {
    if (SKIP.has(name)) { log(`agent: ${name} skipped`); return undefined }
    currentStep = `agent:${name}`
    const r = await step(`agent:${name}`, fn)
    out.steps.push(name)
    return r
  }
  const now = () => new Date().toISOString()

  const server = await s('describeServer', () => agent.com.atproto.server.describeServer())
  const domains = server?.data.availableUserDomains ?? []
  ensure(!server?.data.inviteCodeRequired, 'agent:describeServer', 'inviteCodeRequired=true: the check cannot create an account')
  const domain = domains[0] ?? '.test'
  const handle = `t${randomBytes(5).toString('hex')}${domain.startsWith('.') ? domain : '.' + domain}`
  const password = randomBytes(12).toString('hex')
  const email = `${handle.split('.')[0]}@devnet.invalid`

  const created = await s('createAccount', () => agent.createAccount({ handle, email, password }))
  const did = created.data.did
  ensure(did.startsWith('did:'), 'agent:createAccount', `did "${did}"`)
  ensure(created.data.handle === handle, 'agent:createAccount', `handle "${created.data.handle}" != requested "${handle}"`)
  out.did = did
  out.handle = handle
  out.createAccountDidDoc = created.data.didDoc !== undefined
  // With a didDoc in the response, AtpAgent sends every later request to the
  // doc's #atproto_pds endpoint; without one it keeps using the service URL.
  const dispatch = trimSlash(agent.dispatchUrl.toString())
  ensure(dispatch === pds, 'agent:createAccount', `agent would now send requests to ${dispatch}, not ${pds} (didDoc #atproto_pds)`)

  await s('login', async () => {
    const res = await agent.login({ identifier: handle, password })
    ensure(res.data.did === did, 'agent:login', `login returned did ${res.data.did}, want ${did}`)
    ensure(trimSlash(agent.dispatchUrl.toString()) === pds, 'agent:login',
      `agent would now send requests to ${agent.dispatchUrl} (didDoc #atproto_pds)`)
    out.loginDidDoc = res.data.didDoc !== undefined
    return res
  })
  await s('getSession', async () => {
    const res = await agent.com.atproto.server.getSession()
    ensure(res.data.did === did && res.data.handle === handle, 'agent:getSession', `got ${res.data.did} ${res.data.handle}`)
  })

  const postA = await s('createRecord', async () => {
    const res = await agent.com.atproto.repo.createRecord({
      repo: did, collection: 'app.bsky.feed.post',
      record: { $type: 'app.bsky.feed.post', text: 'interop post A', createdAt: now() },
    })
    ensure(res.data.uri.startsWith(`at://${did}/app.bsky.feed.post/`), 'agent:createRecord', `uri ${res.data.uri}`)
    return res.data
  })
  const rkeyA = postA.uri.split('/').pop()

  await s('putRecord', async () => {
    const p1 = await agent.com.atproto.repo.putRecord({
      repo: did, collection: 'app.bsky.actor.profile', rkey: 'self',
      record: { $type: 'app.bsky.actor.profile', displayName: 'interop one' },
    })
    const p2 = await agent.com.atproto.repo.putRecord({
      repo: did, collection: 'app.bsky.actor.profile', rkey: 'self',
      record: { $type: 'app.bsky.actor.profile', displayName: 'interop two' },
    })
    ensure(p1.data.uri === `at://${did}/app.bsky.actor.profile/self`, 'agent:putRecord', `uri ${p1.data.uri}`)
    ensure(p1.data.cid !== p2.data.cid, 'agent:putRecord', 'updating the record did not change its cid')
  })

  await s('getRecord', async () => {
    const res = await agent.com.atproto.repo.getRecord({ repo: did, collection: 'app.bsky.feed.post', rkey: rkeyA })
    ensure(res.data.uri === postA.uri, 'agent:getRecord', `uri ${res.data.uri}`)
    ensure(res.data.cid === postA.cid, 'agent:getRecord', `cid ${res.data.cid} != createRecord's ${postA.cid}`)
    ensure(res.data.value.text === 'interop post A', 'agent:getRecord', 'record value differs')
    const prof = await agent.com.atproto.repo.getRecord({ repo: did, collection: 'app.bsky.actor.profile', rkey: 'self' })
    ensure(prof.data.value.displayName === 'interop two', 'agent:getRecord', 'profile does not hold the putRecord update')
  })

  await s('listRecords', async () => {
    const res = await agent.com.atproto.repo.listRecords({ repo: did, collection: 'app.bsky.feed.post', limit: 10 })
    const hit = res.data.records.find((r) => r.uri === postA.uri)
    ensure(hit && hit.cid === postA.cid, 'agent:listRecords', 'post A is not listed')
  })

  const blob = await s('uploadBlob', async () => {
    const res = await agent.com.atproto.repo.uploadBlob(PNG, { encoding: 'image/png' })
    const b = res.data.blob
    ensure(b.mimeType === 'image/png', 'agent:uploadBlob', `mimeType ${b.mimeType}`)
    ensure(b.size === PNG.length, 'agent:uploadBlob', `size ${b.size}, want ${PNG.length}`)
    ensure(b.ref.code === 0x55, 'agent:uploadBlob', `blob CID codec 0x${b.ref.code.toString(16)}, want raw (0x55)`)
    const digest = await sha256(PNG)
    ensure(Buffer.from(b.ref.multihash.digest).equals(Buffer.from(digest)), 'agent:uploadBlob', 'blob CID is not sha256 of the bytes')
    return b
  })

  const postB = await s('createRecord(embed)', async () => {
    const res = await agent.com.atproto.repo.createRecord({
      repo: did, collection: 'app.bsky.feed.post',
      record: {
        $type: 'app.bsky.feed.post', text: 'interop post B', createdAt: now(),
        embed: { $type: 'app.bsky.embed.images', images: [{ alt: 'pixel', image: blob, aspectRatio: { width: 1, height: 1 } }] },
      },
    })
    const got = await agent.com.atproto.repo.getRecord({ repo: did, collection: 'app.bsky.feed.post', rkey: res.data.uri.split('/').pop() })
    const ref = got.data.value?.embed?.images?.[0]?.image
    ensure(ref && ref.ref?.toString() === blob.ref.toString() && ref.mimeType === 'image/png' && ref.size === PNG.length,
      'agent:createRecord(embed)', `stored blob ref reads back as ${JSON.stringify(ref)}`)
    return res.data
  })

  await s('getBlob', async () => {
    const res = await agent.com.atproto.sync.getBlob({ did, cid: blob.ref.toString() })
    ensure(res.data instanceof Uint8Array, 'agent:getBlob',
      `body decoded as ${typeof res.data} (content-type ${res.headers['content-type']}): must not be json or text/*`)
    ensure(Buffer.from(res.data).equals(Buffer.from(PNG)), 'agent:getBlob', `got ${res.data.length} bytes that differ from the upload`)
    out.getBlobContentType = res.headers['content-type']
  })

  await s('deleteRecord', async () => {
    await agent.com.atproto.repo.deleteRecord({ repo: did, collection: 'app.bsky.feed.post', rkey: rkeyA })
    try {
      await agent.com.atproto.repo.getRecord({ repo: did, collection: 'app.bsky.feed.post', rkey: rkeyA })
    } catch (err) {
      ensure(err instanceof XRPCError && err.error === 'RecordNotFound', 'agent:deleteRecord',
        `getRecord after delete: ${describeErr(err)} (want error RecordNotFound)`)
      return
    }
    throw new StepError('agent:deleteRecord', 'getRecord still returns the deleted record')
  })

  let rkeyD
  const rkeyC = makeTid()
  await s('applyWrites', async () => {
    const res = await agent.com.atproto.repo.applyWrites({
      repo: did,
      writes: [
        { $type: 'com.atproto.repo.applyWrites#create', collection: 'app.bsky.feed.post', rkey: rkeyC,
          value: { $type: 'app.bsky.feed.post', text: 'interop post C', createdAt: now() } },
        { $type: 'com.atproto.repo.applyWrites#create', collection: 'app.bsky.feed.post',
          value: { $type: 'app.bsky.feed.post', text: 'interop post D', createdAt: now() } },
        { $type: 'com.atproto.repo.applyWrites#update', collection: 'app.bsky.actor.profile', rkey: 'self',
          value: { $type: 'app.bsky.actor.profile', displayName: 'interop three' } },
      ],
    })
    const types = (res.data.results ?? []).map((r) => r.$type)
    const want = ['com.atproto.repo.applyWrites#createResult', 'com.atproto.repo.applyWrites#createResult',
      'com.atproto.repo.applyWrites#updateResult']
    ensure(JSON.stringify(types) === JSON.stringify(want), 'agent:applyWrites', `results $types ${JSON.stringify(types)}`)
    ensure(res.data.results[0].uri === `at://${did}/app.bsky.feed.post/${rkeyC}`, 'agent:applyWrites', `uri ${res.data.results[0].uri}`)
    rkeyD = res.data.results[1].uri.split('/').pop()
    const del = await agent.com.atproto.repo.applyWrites({
      repo: did,
      writes: [{ $type: 'com.atproto.repo.applyWrites#delete', collection: 'app.bsky.feed.post', rkey: rkeyC }],
    })
    const delTypes = (del.data.results ?? []).map((r) => r.$type)
    ensure(JSON.stringify(delTypes) === JSON.stringify(['com.atproto.repo.applyWrites#deleteResult']),
      'agent:applyWrites', `delete results $types ${JSON.stringify(delTypes)}`)
  })

  await s('describeRepo', async () => {
    const res = await agent.com.atproto.repo.describeRepo({ repo: did })
    ensure(res.data.did === did && res.data.handle === handle, 'agent:describeRepo', `got ${res.data.did} ${res.data.handle}`)
    for (const c of ['app.bsky.feed.post', 'app.bsky.actor.profile']) {
      ensure(res.data.collections.includes(c), 'agent:describeRepo', `collections ${JSON.stringify(res.data.collections)} lack ${c}`)
    }
    out.handleIsCorrect = res.data.handleIsCorrect
  })

  await s('resolveHandle', async () => {
    const res = await agent.com.atproto.identity.resolveHandle({ handle })
    ensure(res.data.did === did, 'agent:resolveHandle', `resolved to ${res.data.did}, want ${did}`)
  })

  await s('refreshSession', async () => {
    // Tokens may repeat (same claims within one second); what matters is that
    // the refreshed pair is accepted.
    await agent.sessionManager.refreshSession()
    ensure(agent.session?.did === did, 'agent:refreshSession', 'session lost its did')
    ensure(agent.session?.accessJwt && agent.session?.refreshJwt, 'agent:refreshSession', 'no tokens after refresh')
    await agent.com.atproto.server.getSession()
    const post = await agent.com.atproto.repo.createRecord({
      repo: did, collection: 'app.bsky.feed.post',
      record: { $type: 'app.bsky.feed.post', text: 'interop post E', createdAt: now() },
    })
    await agent.com.atproto.repo.deleteRecord({ repo: did, collection: 'app.bsky.feed.post', rkey: post.data.uri.split('/').pop() })
  })

  // Read everything back through the sync endpoint: the repo must verify and
  // hold exactly what the steps above left (posts B and D, the profile).
  const final = await s('getRepo', async () => {
    const res = await agent.com.atproto.sync.getRepo({ did })
    const key = await resolveKey(did, true)
    const v = await verifyRepoCar(res.data, did, key)
    const paths = v.creates.map((c) => `${c.collection}/${c.rkey}`).sort()
    const want = [`app.bsky.actor.profile/self`, `app.bsky.feed.post/${postB.uri.split('/').pop()}`,
      `app.bsky.feed.post/${rkeyD}`].sort()
    if (!SKIP.has('applyWrites')) {
      ensure(JSON.stringify(paths) === JSON.stringify(want), 'agent:getRepo',
        `repo holds ${JSON.stringify(paths)}, want ${JSON.stringify(want)}`)
    }
    return v.commit
  })
  out.finalRev = final?.rev
  log(`agent: ${out.steps.length} steps passed for ${handle} (${did})`)
  return out
}

// ------------------------------------------------------------------- main

const main = async () => {
  log(`node ${process.version}; plc ${PLC}; relay ${RELAY}; pds ${PDS.join(', ')}; ${SEEDED_COUNT} seeded accounts`)
  const fh = SKIP.has('firehose') ? null : runFirehose()
  if (fh) summary.firehose = fh.stats // live view, so a timeout still reports progress
  // A firehose failure surfaces at once, whatever else is running.
  const race = (p) => (fh ? Promise.race([p, fh.failed()]) : p)
  try {
    if (!SKIP.has('repos')) summary.repos = await race(checkRepos())
    if (!SKIP.has('agent')) summary.agent = await race(runAgent())
    if (fh) {
      if (EXPECT_LIVE && summary.agent?.finalRev) fh.expectLive(summary.agent.did, summary.agent.finalRev)
      currentStep = 'firehose:wait'
      const progress = setInterval(() => log(`firehose: ${fh.describe()}`), 5000)
      try {
        await fh.wait()
      } finally {
        clearInterval(progress)
      }
      summary.firehose = { ...fh.stats }
      log(`firehose: ${fh.describe()}`)
      await fh.stop()
    }
  } catch (err) {
    const stepName = err instanceof StepError ? err.step : currentStep
    const message = err instanceof StepError ? err.message : describeErr(err)
    if (fh) summary.firehose = { ...fh.stats }
    log(`FAILED at ${stepName}: ${message}`)
    if (fh) log(`firehose state: ${fh.describe()}`)
    finish(1, { ...summary, ok: false, step: stepName, error: message })
  }
  summary.ok = true
  summary.seconds = (Date.now() - T0) / 1000
  log('all checks passed')
  finish(0, summary)
}

main()
