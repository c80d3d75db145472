// @skyware/jetstream (a Jetstream client from npm) against atpdb's /subscribe.
// Usage: node jetstream-consumer.mjs <ws-endpoint> <cursor-µs> <collection,...> <quiet-ms>
// Prints one JSON line: every event it was given, in order, once the stream has been quiet
// for <quiet-ms>.
import { Jetstream } from '@skyware/jetstream'

const [endpoint, cursor, collections, quietMs] = process.argv.slice(2)
const jetstream = new Jetstream({
  endpoint,
  cursor: Number(cursor),
  wantedCollections: collections.split(','),
})
const seen = []
const errors = []
let last = Date.now()
const note = (event) => {
  last = Date.now()
  seen.push({
    kind: event.kind,
    did: event.did,
    time_us: event.time_us,
    collection: event.commit?.collection,
    rkey: event.commit?.rkey,
    operation: event.commit?.operation,
    cid: event.commit?.cid,
    handle: event.identity?.handle,
  })
}
jetstream.on('commit', note)
jetstream.on('identity', note)
jetstream.on('account', note)
jetstream.on('error', (err) => errors.push(String(err)))
jetstream.start()
const timer = setInterval(() => {
  if (Date.now() - last > Number(quietMs)) {
    clearInterval(timer)
    jetstream.close()
    process.stdout.write(JSON.stringify({ seen, errors, cursor: jetstream.cursor }) + '\n')
    process.exit(0)
  }
}, 100)
