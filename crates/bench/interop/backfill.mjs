// The TypeScript side of `sync-bench backfill --compare-ts`: @atproto/repo's verifyRepoCar
// over the same CAR files atpdb verifies.
//
//   node backfill.mjs --interop DIR --manifest FILE
//
// --interop    the directory whose node_modules holds the packages (crates/devnet/interop)
// --manifest   a JSON array of {"file", "did", "key" (did:key), "records"}
//
// Every file is read into memory first; then, timed, each goes through
// `verifyRepoCar(bytes, did, key)`: every block hashed, the commit's DID and signature
// checked, the whole MST walked and every record's block required. Each repo must yield
// the record count the manifest names.
//
// Prints one JSON line: {"repos", "records", "seconds", "records_per_second"}.
// Exit 0 when every repo verified with the right count, 1 otherwise.

import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
}
for (const name of ['interop', 'manifest']) {
  if (!args[name]) {
    process.stderr.write(`backfill.mjs: --${name} is required\n`)
    process.exit(2)
  }
}

const require = createRequire(join(args.interop, 'package.json'))
const load = async (name) => import(pathToFileURL(require.resolve(name)).href)
const { verifyRepoCar } = await load('@atproto/repo')

const finish = (code, summary) => {
  process.stdout.write(JSON.stringify(summary) + '\n')
  process.exit(code)
}

const manifest = JSON.parse(readFileSync(args.manifest, 'utf8'))
const repos = manifest.map((entry) => ({ ...entry, bytes: readFileSync(entry.file) }))

let records = 0
const started = performance.now()
for (const repo of repos) {
  let verified
  try {
    verified = await verifyRepoCar(repo.bytes, repo.did, repo.key)
  } catch (err) {
    finish(1, { repos: repos.length, records, failed: `${repo.did}: ${err.message}` })
  }
  if (verified.creates.length !== repo.records) {
    finish(1, {
      repos: repos.length,
      records,
      failed: `${repo.did}: ${verified.creates.length} records, the PDS holds ${repo.records}`,
    })
  }
  records += verified.creates.length
}
const seconds = (performance.now() - started) / 1000
finish(0, { repos: repos.length, records, seconds, records_per_second: records / seconds })
