// Benchmark corpus: repository CAR files written by the reference TypeScript
// implementation (@atproto/repo, keys from @atproto/crypto), so atpdb's
// verifier can be timed against another implementation on bytes that neither
// of them wrote.
//
//   ./setup.sh     # once: npm ci into ./node_modules, including Node 24
//   node_modules/.bin/node corpus.mjs --out DIR [--repos N] [--seed S] [--large K]
//       [--large-records R] [--min-records A] [--max-records B] [--p256-every P] [--check]
//
//   --out DIR           output directory (created; files already there are overwritten)
//   --repos N           total repos, the K large ones included (default 200)
//   --seed S            seed for everything drawn at random except keys (default 1)
//   --large K           how many repos get R records each; they are 000..K-1 (default 2)
//   --large-records R   records in each large repo (default 60000)
//   --min-records A     the other N-K repos get a record count drawn log-uniformly
//   --max-records B     from [A, B] (defaults 10 and 4000)
//   --p256-every P      every P-th repo (index P-1, 2P-1, ...) signs with P-256
//                       instead of secp256k1; 0 for none (default 10)
//   --check             re-read every written CAR and verify it (see below)
//
// The defaults (200 repos, 224k records, 86 MB) took 2m18s with --check
// (100s generating, 38s checking) on one core of a busy 2-core machine.
//
// Writes DIR/NNN.car (one per repo), DIR/keys.jsonl ({"did", "key"} per line,
// key being the signing did:key) and DIR/manifest.json ({file, did, records,
// bytes, curve, commits, blocks} per file). The DIDs (did:plc: + 24 base32
// chars, resolvable nowhere), record counts, record keys and records follow
// from the seed alone, and so does every MST node; keypairs are fresh on every
// run (Keypair.create) and commit revs come from the wall clock, so each CAR's
// commit block differs between runs.
//
// Records mimic a Bluesky account: likes, posts (varied length and scripts,
// langs, facets with UTF-8 byte offsets, replies, images / external / quote
// embeds with blob refs to made-up raw CIDs), reposts, follows, a few blocks,
// one app.bsky.actor.profile "self", and some fm.teal.alpha.feed.play. Record
// keys are TIDs of each record's createdAt, strictly increasing. Strong refs
// point at made-up CIDs of records in other, made-up repos.
//
// Each repo is built through the library's real write path on a
// MemoryBlockstore: Repo.create with the profile and all records but a tail,
// then Repo.applyWrites commits of 50..400 ops each for the tail (creates,
// ~3% deletes, profile updates), so the store has dropped every block a
// commit removed, as a PDS's block table does. The CAR is
// getFullRepo(storage, head): the commit as single root, then the commit
// block, every MST node reachable from it and every record, each once. That is
// the block set a PDS's com.atproto.sync.getRepo returns for its latest commit;
// the order is a breadth-first walk, where the PDS dumps its table newest rev
// first.
//
// --check re-reads each file from disk and requires: every block's CID to
// match its bytes, no block twice, verifyRepo to accept the commit signature
// for the DID and key, as many records as the manifest says, and the block set
// to be exactly the commit plus MST.allCids() of its tree (nothing stale or
// missing), as many blocks as the generating store held.
//
// Prints progress on stderr and one JSON summary line on stdout. Exit 0 on
// success, 1 on any failure (a failed check names the file), 2 on bad usage.
//
// @atproto/common-web (TID) and @atproto/lex-data (CIDs) are imported directly:
// both are dependencies of @atproto/repo, hoisted and pinned by package-lock.json.

import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { TID } from '@atproto/common-web'
import { P256Keypair, Secp256k1Keypair } from '@atproto/crypto'
import { CBOR_DATA_CODEC, SHA256_HASH_CODE, cidForRawHash, createCid } from '@atproto/lex-data'
import {
  BlockMap,
  MemoryBlockstore,
  MST,
  Repo,
  WriteOpAction,
  cidForRecord,
  concatBytesAsync,
  def as repoDef,
  getFullRepo,
  readCarStream,
  verifyRepo,
} from '@atproto/repo'

const T0 = Date.now()
const elapsed = () => (Date.now() - T0) / 1000
const log = (msg) => process.stderr.write(`corpus [${elapsed().toFixed(1)}s]: ${msg}\n`)

const finish = (code, summary) => {
  process.stdout.write(JSON.stringify(summary) + '\n')
  process.exit(code)
}

// ---------------------------------------------------------------- arguments

const USAGE = 'usage: node corpus.mjs --out DIR [--repos N] [--seed S] [--large K] [--large-records R] ' +
  '[--min-records A] [--max-records B] [--p256-every P] [--check]\n'

const usage = (problem) => {
  process.stderr.write(`corpus: ${problem}\n${USAGE}`)
  finish(2, { ok: false, error: problem })
}

const opts = {
  out: null, repos: 200, seed: '1', large: 2, largeRecords: 60000,
  minRecords: 10, maxRecords: 4000, p256Every: 10, check: false,
}
{
  const intFlags = {
    '--repos': 'repos', '--large': 'large', '--large-records': 'largeRecords',
    '--min-records': 'minRecords', '--max-records': 'maxRecords', '--p256-every': 'p256Every',
  }
  const args = process.argv.slice(2)
  for (let i = 0; i < args.length; i++) {
    const flag = args[i]
    if (flag === '--check') { opts.check = true; continue }
    if (flag === '-h' || flag === '--help') { process.stderr.write(USAGE); process.exit(0) }
    const value = args[++i]
    if (value === undefined) usage(`${flag} needs a value`)
    if (flag === '--out') opts.out = value
    else if (flag === '--seed') opts.seed = value
    else if (flag in intFlags) {
      if (!/^\d+$/.test(value)) usage(`${flag} must be a non-negative integer, got "${value}"`)
      opts[intFlags[flag]] = Number(value)
    } else usage(`unknown argument "${flag}"`)
  }
  if (!opts.out) usage('--out is required')
  if (opts.repos < 1) usage('--repos must be at least 1')
  if (opts.large > opts.repos) usage('--large cannot exceed --repos')
  if (opts.minRecords < 1 || opts.largeRecords < 1) usage('record counts must be at least 1 (the profile)')
  if (opts.maxRecords < opts.minRecords) usage('--max-records must be >= --min-records')
}

// ------------------------------------------------------- seeded randomness

// FNV-1a, to turn the seed string (and seed/index) into a 32-bit PRNG state.
const fnv1a = (str) => {
  let h = 0x811c9dc5
  for (let i = 0; i < str.length; i++) {
    h ^= str.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  return h >>> 0
}

// mulberry32: small, fast, good enough for test data. Returns [0, 1).
const mulberry32 = (state) => () => {
  state = (state + 0x6d2b79f5) | 0
  let t = Math.imul(state ^ (state >>> 15), 1 | state)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

// Helpers over one PRNG; each repo gets its own, seeded from (seed, index), so
// a repo's content does not depend on how many repos came before it.
const makeRand = (rng) => {
  const r = {
    float: rng,
    int: (lo, hi) => lo + Math.floor(rng() * (hi - lo + 1)), // inclusive
    chance: (p) => rng() < p,
    pick: (arr) => arr[Math.floor(rng() * arr.length)],
    bytes: (n) => {
      const out = new Uint8Array(n)
      for (let i = 0; i < n; i += 4) {
        const v = Math.floor(rng() * 4294967296)
        for (let j = 0; j < 4 && i + j < n; j++) out[i + j] = (v >>> (8 * j)) & 0xff
      }
      return out
    },
    // Picks a key of `weights` ({name: weight}) with probability proportional to its weight.
    weighted: (weights) => {
      const total = Object.values(weights).reduce((a, b) => a + b, 0)
      let x = rng() * total
      for (const [k, w] of Object.entries(weights)) {
        if ((x -= w) < 0) return k
      }
      return Object.keys(weights).at(-1)
    },
  }
  r.base32 = (n) => {
    const alphabet = 'abcdefghijklmnopqrstuvwxyz234567'
    let s = ''
    for (let i = 0; i < n; i++) s += alphabet[Math.floor(rng() * 32)]
    return s
  }
  r.uuid = () => {
    const hex = [...r.bytes(16)].map((b) => b.toString(16).padStart(2, '0')).join('')
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-a${hex.slice(17, 20)}-${hex.slice(20, 32)}`
  }
  return r
}

// ------------------------------------------------------------- record mix

const WORDS = [
  'the', 'a', 'just', 'really', 'today', 'new', 'post', 'thread', 'atproto', 'bluesky',
  'coffee', 'morning', 'rust', 'code', 'release', 'photo', 'cat', 'dog', 'music', 'album',
  'weekend', 'great', 'think', 'about', 'this', 'that', 'love', 'here', 'some', 'more',
  'with', 'from', 'what', 'when', 'why', 'how', 'people', 'time', 'good', 'work', 'still',
  'going', 'back', 'first', 'last', 'best', 'finally', 'shipped', 'reading', 'garden',
  'train', 'rain', 'sunset', 'honestly', 'lol', 'yes', 'no', 'maybe', 'tomorrow', 'again',
  // Multi-byte text, so facet byte offsets and string lengths disagree.
  'café', 'naïve', 'über', 'señor', 'smørrebrød', '🦋', '✨', '😂', '🙏🏽', '❤️', '👩‍💻',
  'こんにちは', '日本語', 'ありがとう', '今日', 'données', 'Привет', 'مرحبا', '你好',
]
const LANGS = [['en'], ['en'], ['en'], ['en'], ['en'], ['en'], ['en'], ['ja'], ['de'], ['pt'], ['en', 'es'], ['fr']]
const TAGS = ['rust', 'atproto', 'photography', 'art', 'music', 'booksky', 'gardening', 'caturday']
const DOMAINS = ['example.com', 'news.example.org', 'blog.example.net', 'video.example.tv', 'docs.example.dev']
const ARTISTS = ['Boards of Canada', 'Aphex Twin', 'Björk', 'Ryuichi Sakamoto', 'Khruangbin', 'Hiatus Kaiyote', 'Nujabes', 'Sigur Rós']

// Share of records per collection among the creates (the profile is extra):
// roughly a Bluesky account that likes more than it posts.
const COLLECTION_WEIGHTS = {
  'app.bsky.feed.like': 46,
  'app.bsky.feed.post': 26,
  'app.bsky.feed.repost': 10,
  'app.bsky.graph.follow': 14,
  'app.bsky.graph.block': 1,
  'fm.teal.alpha.feed.play': 3,
}

const utf8Len = (s) => Buffer.byteLength(s, 'utf8')

// Generates the records of one account along a timeline: each record's rkey
// is the TID of its time (microseconds), createdAt the same time in ms; times
// are >= 1s apart, so rkeys strictly increase and no two records share a CID
// (which also keeps MemoryBlockstore from dropping a block still in use).
class Account {
  constructor(rand, did, targetRecords) {
    this.rand = rand
    this.did = did
    // Start between 2023-03 and 2024-03, spread the records over <= 600 days.
    this.micros = (Date.UTC(2023, 2, 1) + rand.float() * 366 * 86400e3) * 1000
    this.meanGapMicros = Math.min(3 * 3600e6, Math.max(1e6, (600 * 86400e6) / targetRecords))
    this.clockId = rand.int(0, 31)
    this.profileVersion = 0
    this.followed = [] // DIDs this account follows: likes and replies lean on them
    this.ownPosts = [] // strong refs to this account's own posts (self-replies, quotes)
  }

  // Advances the clock; returns { rkey, createdAt }.
  tick() {
    const gap = -Math.log(1 - this.rand.float()) * this.meanGapMicros
    this.micros = Math.floor(this.micros + Math.max(1e6, gap)) // >= 1s apart: createdAt (ms) stays unique
    return {
      rkey: TID.fromTime(this.micros, this.clockId).toString(),
      createdAt: new Date(Math.floor(this.micros / 1000)).toISOString(),
    }
  }

  otherDid() {
    if (this.followed.length > 0 && this.rand.chance(0.6)) return this.rand.pick(this.followed)
    return `did:plc:${this.rand.base32(24)}`
  }

  // A made-up dag-cbor CID (sha2-256) for a record in another repo, as a
  // string: com.atproto.repo.strongRef carries the CID as a string, not a link.
  fakeRecordCid() {
    return createCid(CBOR_DATA_CODEC, SHA256_HASH_CODE, this.rand.bytes(32)).toString()
  }

  // A strong ref to some post: often another account's, sometimes our own.
  postRef() {
    if (this.ownPosts.length > 0 && this.rand.chance(0.1)) return this.rand.pick(this.ownPosts)
    const tid = TID.fromTime(Math.floor(this.micros - this.rand.float() * 30 * 86400e6), this.rand.int(0, 31))
    return { uri: `at://${this.otherDid()}/app.bsky.feed.post/${tid}`, cid: this.fakeRecordCid() }
  }

  // A blob ref to a made-up raw CID: nothing fetches blobs here.
  blob(mimeType, minSize, maxSize) {
    return { $type: 'blob', ref: cidForRawHash(this.rand.bytes(32)), mimeType, size: this.rand.int(minSize, maxSize) }
  }

  words(maxChars) {
    let s = ''
    for (;;) {
      const w = this.rand.pick(WORDS)
      if (s.length + w.length + 1 > maxChars) return s
      s = s ? `${s} ${w}` : w
    }
  }

  // Post text, with facets on ~20%; byte offsets are over the UTF-8 text.
  postText() {
    const r = this.rand
    const size = r.weighted({ empty: 3, short: 30, medium: 45, long: 22 })
    const maxChars = { empty: 0, short: r.int(5, 40), medium: r.int(40, 150), long: r.int(150, 260) }[size]
    let text = this.words(maxChars)
    const facets = []
    if (size !== 'empty' && r.chance(0.2)) {
      for (let n = r.int(1, 3); n > 0; n--) {
        const kind = r.weighted({ mention: 4, link: 4, tag: 2 })
        let piece
        let feature
        if (kind === 'mention') {
          const did = this.otherDid()
          piece = `@${r.base32(r.int(4, 12))}.bsky.social`
          feature = { $type: 'app.bsky.richtext.facet#mention', did }
        } else if (kind === 'link') {
          const uri = `https://${r.pick(DOMAINS)}/${r.base32(r.int(6, 30))}`
          piece = uri.replace(/^https:\/\//, '').slice(0, 30)
          feature = { $type: 'app.bsky.richtext.facet#link', uri }
        } else {
          const tag = r.pick(TAGS)
          piece = `#${tag}`
          feature = { $type: 'app.bsky.richtext.facet#tag', tag }
        }
        // app.bsky.feed.post text is at most 300 graphemes; UTF-16 length bounds that.
        if (text.length + 1 + piece.length > 300) break
        if (text) text += ' '
        const byteStart = utf8Len(text)
        text += piece
        facets.push({
          $type: 'app.bsky.richtext.facet',
          index: { byteStart, byteEnd: byteStart + utf8Len(piece) },
          features: [feature],
        })
      }
    }
    return { text, facets }
  }

  images() {
    const r = this.rand
    const images = []
    for (let n = r.int(1, 4); n > 0; n--) {
      const image = { alt: r.chance(0.6) ? this.words(r.int(10, 120)) : '', image: this.blob('image/jpeg', 20_000, 1_000_000) }
      if (r.chance(0.9)) image.aspectRatio = { width: r.int(400, 4000), height: r.int(400, 4000) }
      images.push(image)
    }
    return { $type: 'app.bsky.embed.images', images }
  }

  post(createdAt) {
    const r = this.rand
    const { text, facets } = this.postText()
    const rec = { $type: 'app.bsky.feed.post', text, createdAt, langs: r.pick(LANGS) }
    if (facets.length > 0) rec.facets = facets
    if (r.chance(0.3)) {
      const parent = this.postRef()
      rec.reply = { root: r.chance(0.5) ? parent : this.postRef(), parent }
    }
    if (r.chance(0.25) || text === '') {
      const kind = text === '' ? 'images' : r.weighted({ images: 50, external: 25, record: 20, recordWithMedia: 5 })
      if (kind === 'images') {
        rec.embed = this.images()
      } else if (kind === 'external') {
        const external = {
          uri: `https://${r.pick(DOMAINS)}/${r.base32(r.int(8, 40))}`,
          title: this.words(r.int(10, 80)),
          description: this.words(r.int(0, 200)),
        }
        if (r.chance(0.7)) external.thumb = this.blob('image/jpeg', 5_000, 900_000)
        rec.embed = { $type: 'app.bsky.embed.external', external }
      } else if (kind === 'record') {
        rec.embed = { $type: 'app.bsky.embed.record', record: this.postRef() }
      } else {
        rec.embed = {
          $type: 'app.bsky.embed.recordWithMedia',
          record: { $type: 'app.bsky.embed.record', record: this.postRef() },
          media: this.images(),
        }
      }
    }
    return rec
  }

  play(createdAt) {
    const r = this.rand
    const artist = r.pick(ARTISTS)
    return {
      $type: 'fm.teal.alpha.feed.play',
      trackName: this.words(r.int(5, 40)) || 'untitled',
      trackMbId: r.uuid(),
      recordingMbId: r.uuid(),
      duration: r.int(90, 600),
      artists: [{ artistName: artist, artistMbId: r.uuid() }],
      releaseName: this.words(r.int(5, 40)) || 'untitled',
      releaseMbId: r.uuid(),
      playedTime: createdAt,
      submissionClientAgent: 'piper/v0.0.1',
      musicServiceBaseDomain: 'spotify.com',
    }
  }

  profile() {
    const r = this.rand
    this.profileVersion++
    return {
      $type: 'app.bsky.actor.profile',
      displayName: this.words(r.int(4, 40)),
      description: `${this.words(r.int(0, 200))} (v${this.profileVersion})`,
      avatar: this.blob('image/jpeg', 10_000, 900_000),
      banner: this.blob('image/jpeg', 50_000, 2_000_000),
      createdAt: new Date(Math.floor(this.micros / 1000)).toISOString(),
    }
  }

  // One new record in a collection drawn from the mix.
  async create() {
    const collection = this.rand.weighted(COLLECTION_WEIGHTS)
    const { rkey, createdAt } = this.tick()
    let record
    switch (collection) {
      case 'app.bsky.feed.post':
        record = this.post(createdAt)
        this.ownPosts.push({ uri: `at://${this.did}/${collection}/${rkey}`, cid: (await cidForRecord(record)).toString() })
        if (this.ownPosts.length > 200) this.ownPosts.shift()
        break
      case 'app.bsky.feed.like':
      case 'app.bsky.feed.repost':
        record = { $type: collection, subject: this.postRef(), createdAt }
        break
      case 'app.bsky.graph.follow': {
        const subject = `did:plc:${this.rand.base32(24)}`
        this.followed.push(subject)
        if (this.followed.length > 500) this.followed.shift()
        record = { $type: collection, subject, createdAt }
        break
      }
      case 'app.bsky.graph.block':
        record = { $type: collection, subject: `did:plc:${this.rand.base32(24)}`, createdAt }
        break
      default:
        record = this.play(createdAt)
    }
    return { action: WriteOpAction.Create, collection, rkey, record }
  }
}

// ------------------------------------------------------------- one repo

const PROFILE = 'app.bsky.actor.profile'

// History shape. The first commit (Repo.create) holds all records but a tail;
// the tail then arrives through Repo.applyWrites commits of 50..400 ops. The
// tail is capped because applyWrites costs ~10x more per op than Repo.create
// (it builds an inclusion proof for every op), and the final tree does not
// depend on the history: an MST is a function of its current keys and values.
const TAIL_FRACTION = 0.3
const TAIL_CAP = 3000
const DELETE_SHARE = 0.03 // of tail ops, once the repo has > 20 records to pick from

// Builds one repo through Repo.create / Repo.applyWrites and returns the CAR
// of its latest commit as getFullRepo writes it.
const buildRepo = async ({ index, did, keypair, records }) => {
  const rand = makeRand(mulberry32(fnv1a(`${opts.seed}/repo/${index}`)))
  const account = new Account(rand, did, records)
  const storage = new MemoryBlockstore()
  const tail = Math.min(Math.floor(records * TAIL_FRACTION), TAIL_CAP)

  // First commit: the profile and every record but the tail.
  const first = [{ action: WriteOpAction.Create, collection: PROFILE, rkey: 'self', record: account.profile() }]
  while (first.length < records - tail) first.push(await account.create())
  let repo = await Repo.create(storage, did, keypair, first)
  let count = first.length
  let commits = 1
  // Keys of live records other than the profile, for deletes. Keys created in
  // the commit being formatted join only after it, so no commit touches the
  // same key twice.
  const live = first.slice(1).map((op) => [op.collection, op.rkey])

  // Tail commits: creates, deletes (unlike, unfollow, delete a post...) and
  // profile updates (always in the first tail commit), until `records` are live.
  while (count < records) {
    const writes = []
    const fresh = []
    const batch = rand.int(50, 400)
    if (commits === 1 || rand.chance(0.2)) {
      writes.push({ action: WriteOpAction.Update, collection: PROFILE, rkey: 'self', record: account.profile() })
    }
    while (writes.length < batch && count < records) {
      if (live.length > 20 && rand.chance(DELETE_SHARE)) {
        const i = Math.floor(rand.float() * live.length) // swap-remove a random live key
        const [collection, rkey] = live[i]
        live[i] = live[live.length - 1]
        live.pop()
        writes.push({ action: WriteOpAction.Delete, collection, rkey })
        count--
      } else {
        const op = await account.create()
        writes.push(op)
        fresh.push([op.collection, op.rkey])
        count++
      }
    }
    repo = await repo.applyWrites(writes, keypair)
    commits++
    for (const key of fresh) live.push(key)
  }

  const car = await concatBytesAsync(getFullRepo(storage, repo.cid))
  // MemoryBlockstore.applyCommit drops each commit's removedCids, so what it
  // holds now is what a PDS's block table holds for this repo.
  return { car, commits, blocks: storage.blocks.size }
}

// ------------------------------------------------------------- the check

// Re-reads one CAR from disk: CIDs match bytes (readCarStream verifies each
// block), no duplicates, commit signed by `key` for `did`, `records` records,
// and the block set is exactly the commit plus its tree.
const checkCar = async (path, entry, key) => {
  const bytes = readFileSync(path)
  const { roots, blocks: stream } = await readCarStream([bytes])
  if (roots.length !== 1) throw new Error(`${roots.length} roots, want 1`)
  const root = roots[0]
  const blocks = new BlockMap()
  let count = 0
  for await (const block of stream) {
    if (blocks.has(block.cid)) throw new Error(`block ${block.cid} appears twice`)
    blocks.set(block.cid, block.bytes)
    count++
  }
  const verified = await verifyRepo(blocks, root, entry.did, key)
  if (verified.creates.length !== entry.records) {
    throw new Error(`verifyRepo found ${verified.creates.length} records, manifest says ${entry.records}`)
  }
  const commit = await new MemoryBlockstore(blocks).readObj(root, repoDef.commit)
  const reachable = await MST.load(new MemoryBlockstore(blocks), commit.data).allCids()
  reachable.add(root)
  if (reachable.size() !== count) {
    throw new Error(`${count} blocks in the CAR but ${reachable.size()} reachable from the commit`)
  }
  for (const cid of reachable.toList()) {
    if (!blocks.has(cid)) throw new Error(`reachable block ${cid} is missing`)
  }
  if (count !== entry.blocks) throw new Error(`${count} blocks in the CAR but the store held ${entry.blocks}`)
  return verified
}

// ------------------------------------------------------------------ main

const main = async () => {
  mkdirSync(opts.out, { recursive: true })
  const master = makeRand(mulberry32(fnv1a(`${opts.seed}/counts`)))
  const width = Math.max(3, String(opts.repos - 1).length)
  const lnMin = Math.log(opts.minRecords)
  const lnMax = Math.log(opts.maxRecords)

  const plan = []
  for (let index = 0; index < opts.repos; index++) {
    const large = index < opts.large
    const records = large ? opts.largeRecords : Math.round(Math.exp(lnMin + master.float() * (lnMax - lnMin)))
    const didRand = makeRand(mulberry32(fnv1a(`${opts.seed}/did/${index}`)))
    const did = `did:plc:${didRand.base32(24)}`
    const curve = opts.p256Every > 0 && (index + 1) % opts.p256Every === 0 ? 'p256' : 'secp256k1'
    plan.push({ index, large, records, did, curve, file: `${String(index).padStart(width, '0')}.car` })
  }
  log(`${plan.length} repos (${opts.large} x ${opts.largeRecords} records), ` +
    `${plan.reduce((a, p) => a + p.records, 0)} records in all, seed "${opts.seed}", into ${opts.out}`)

  const manifest = []
  const keys = []
  let totalBytes = 0
  let totalRecords = 0
  const genStart = Date.now()
  for (const p of plan) {
    const keypair = p.curve === 'p256'
      ? await P256Keypair.create({ exportable: true })
      : await Secp256k1Keypair.create({ exportable: true })
    const t = Date.now()
    const built = await buildRepo({ ...p, keypair })
    writeFileSync(join(opts.out, p.file), built.car)
    const entry = {
      file: p.file, did: p.did, records: p.records, bytes: built.car.byteLength, curve: p.curve,
      commits: built.commits, blocks: built.blocks,
    }
    manifest.push(entry)
    keys.push({ did: p.did, key: keypair.did() })
    totalBytes += entry.bytes
    totalRecords += entry.records
    if (p.large || manifest.length % 25 === 0 || manifest.length === plan.length) {
      log(`${manifest.length}/${plan.length}: ${p.file} ${p.records} records, ${entry.bytes} bytes, ` +
        `${built.commits} commits in ${((Date.now() - t) / 1000).toFixed(1)}s`)
    }
  }
  const genSeconds = (Date.now() - genStart) / 1000
  writeFileSync(join(opts.out, 'keys.jsonl'), keys.map((k) => JSON.stringify(k) + '\n').join(''))
  writeFileSync(join(opts.out, 'manifest.json'), JSON.stringify(manifest, null, 1) + '\n')
  log(`wrote ${manifest.length} CARs, ${totalRecords} records, ${totalBytes} bytes in ${genSeconds.toFixed(1)}s`)
  const written = new Set(manifest.map((e) => e.file))
  const leftover = readdirSync(opts.out).filter((f) => /^\d+\.car$/.test(f) && !written.has(f))
  if (leftover.length > 0) {
    log(`warning: ${leftover.length} older CARs in ${opts.out} are not in this manifest (e.g. ${leftover[0]})`)
  }

  let checkSeconds = null
  if (opts.check) {
    const checkStart = Date.now()
    for (let i = 0; i < manifest.length; i++) {
      const entry = manifest[i]
      try {
        await checkCar(join(opts.out, entry.file), entry, keys[i].key)
      } catch (err) {
        log(`CHECK FAILED: ${entry.file} (${entry.did}): ${err.message}`)
        finish(1, { ok: false, step: 'check', file: entry.file, did: entry.did, error: err.message })
      }
    }
    checkSeconds = (Date.now() - checkStart) / 1000
    log(`check: all ${manifest.length} CARs verify in ${checkSeconds.toFixed(1)}s`)
  }

  finish(0, {
    ok: true, out: opts.out, seed: opts.seed, files: manifest.length, records: totalRecords, bytes: totalBytes,
    seconds: Number(elapsed().toFixed(1)), generate_seconds: Number(genSeconds.toFixed(1)),
    check_seconds: checkSeconds === null ? null : Number(checkSeconds.toFixed(1)),
  })
}

main().catch((err) => {
  log(`FAILED: ${err.stack ?? err}`)
  finish(1, { ok: false, error: String(err?.message ?? err) })
})
