// A Node.js process started ahead of the request.
// Started by the agent as `node warm_node.js CTRL_FD READY_FD`: it signals
// readiness on READY_FD, blocks reading one JSON message from CTRL_FD (the
// program's environment and file), then runs the program as the main module,
// as `node main.js` would (require.main, process.argv, exit codes, uncaught errors).
'use strict';
const fs = require('fs');
const path = require('path');
const Module = require('module');

// Pay, before the request, for what every program's first steps cost: the
// stdio streams and one pass through the module loader (an empty module).
void process.stdout;
void process.stderr;
require('./warm_prime.js');

const ctrl = Number(process.argv[2]);
const ready = Number(process.argv[3]);
// Modules to load ahead (a sandbox on an egress network); "fetch" loads the fetch implementation.
for (const name of process.argv.slice(4)) {
  if (name === 'fetch') void globalThis.fetch;
  else require(name);
}
fs.writeSync(ready, 'R');
fs.closeSync(ready);
const chunks = [];
const buf = Buffer.alloc(65536);
for (;;) {
  let n;
  try {
    n = fs.readSync(ctrl, buf, 0, buf.length, null);
  } catch (e) {
    if (e.code === 'EAGAIN') continue;
    throw e;
  }
  if (n === 0) break;
  chunks.push(Buffer.from(buf.subarray(0, n)));
}
fs.closeSync(ctrl);
const msg = JSON.parse(Buffer.concat(chunks).toString('utf8'));
for (const key of Object.keys(process.env)) delete process.env[key];
Object.assign(process.env, msg.env);
// What NODE_OPTIONS=--require <preload> would have done at start-up (the egress preload).
if (msg.preload) require(path.resolve(msg.preload));
process.argv = [process.argv[0], path.resolve(msg.file)];
// From a fresh tick, so that no frame of this bootstrap is on the program's stack.
setImmediate(Module.runMain);
