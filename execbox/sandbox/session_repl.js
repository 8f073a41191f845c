// JavaScript REPL worker of a session.
// Started by session_agent.py as `node session_repl.js CTRL_FD STATUS_FD`. It writes
// {"ready": true} on STATUS_FD, then for each message on CTRL_FD (a big-endian uint32
// length, then JSON {"id", "code", "env"}) runs the code as a script in this one
// realm, as Node's REPL does: globals and top-level let/const/class stay for the next
// call, `require` resolves from the working directory, the completion value (when not
// undefined) is printed with util.inspect, and a returned promise is awaited. Code
// with a top-level `await` runs inside an async function (its declarations are then
// local to the call: assign to globalThis to keep them). An exception prints its
// stack and gives exit code 1; env holds for this call only. Then it writes
// {"id", "exit_code", "interrupted"} on STATUS_FD (stdout/stderr writes to pipes are
// synchronous in Node on Linux, so the call's output is already in the pipes).
//
// SIGINT (the agent's timeout) interrupts a running script (vm breakOnSigint) or
// stops waiting for its promise; errors thrown later by timers are printed and do not
// end the worker.
'use strict';
const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');
const Module = require('module');

const ctrlFd = Number(process.argv[2]);
const statusFd = Number(process.argv[3]);
process.argv = [process.argv[0]];
globalThis.require = Module.createRequire(path.join(process.cwd(), '[repl]'));

let current = null; // the call waiting for a promise: {interrupt()}
process.on('SIGINT', () => {
  if (current) current.interrupt();
});
function printError(e) {
  let text = e && e.stack ? String(e.stack) : util.inspect(e);
  // Stop at the cell's outermost frame: what called it is this worker, not the user's code.
  const lines = text.split('\n');
  let last = -1;
  lines.forEach((line, i) => {
    if (/^\s+at .*<cell \d+>/.test(line)) last = i;
  });
  if (last >= 0) text = lines.slice(0, last + 1).join('\n');
  else if (e instanceof SyntaxError) text = lines.filter((line) => !/^\s+at /.test(line)).join('\n').trimEnd();
  try {
    process.stderr.write(text + '\n');
  } catch (_) {
    // stderr is gone: nothing to tell
  }
}
process.on('uncaughtException', printError);
process.on('unhandledRejection', printError);

function writeStatus(obj) {
  fs.writeSync(statusFd, JSON.stringify(obj) + '\n');
}

function compile(code, filename) {
  try {
    return new vm.Script(code, { filename });
  } catch (e) {
    if (!(e instanceof SyntaxError) || !/await/.test(e.message)) throw e;
    // Top-level await: run the code as the body of an async function.
    return new vm.Script('(async () => {\n' + code + '\n})()', { filename, lineOffset: -1 });
  }
}

let n = 0;
async function runCall(msg) {
  n += 1;
  const saved = Object.assign({}, process.env);
  Object.assign(process.env, msg.env || {});
  let exitCode = 0;
  let interrupted = false;
  try {
    const script = compile(msg.code, `<cell ${n}>`);
    let value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    if (value && typeof value.then === 'function') {
      value = await new Promise((resolve, reject) => {
        current = {
          interrupt() {
            interrupted = true;
            reject(new Error('interrupted'));
          },
        };
        value.then(resolve, reject);
      });
    }
    if (value !== undefined) process.stdout.write(util.inspect(value) + '\n');
  } catch (e) {
    if (interrupted || (e && e.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED')) {
      interrupted = true;
      exitCode = 130;
      process.stderr.write('Interrupted: the call ran past its timeout\n');
    } else {
      printError(e);
      exitCode = 1;
    }
  } finally {
    current = null;
  }
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, saved);
  writeStatus({ id: msg.id, exit_code: exitCode, interrupted });
}

const queue = [];
let busy = false;
async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length) await runCall(queue.shift());
  busy = false;
}

let buf = Buffer.alloc(0);
const input = new net.Socket({ fd: ctrlFd, readable: true, writable: false });
input.on('data', (chunk) => {
  buf = Buffer.concat([buf, chunk]);
  while (buf.length >= 4) {
    const len = buf.readUInt32BE(0);
    if (buf.length < 4 + len) break;
    queue.push(JSON.parse(buf.subarray(4, 4 + len).toString('utf8')));
    buf = buf.subarray(4 + len);
  }
  pump();
});
input.on('end', () => process.exit(0));
writeStatus({ ready: true });
