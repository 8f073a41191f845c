// State helpers for programs run by execbox (Node.js).
//
//   const { loadState, saveState } = require('execbox-state');
//   const state = loadState({ counter: 0 });
//   state.counter += 1;
//   saveState(state);   // prints OUTPUT_STATE:<json>; the last one wins
'use strict';

function loadState(defaultValue) {
  const raw = process.env.EXECBOX_STATE;
  if (raw === undefined) return defaultValue === undefined ? {} : defaultValue;
  return JSON.parse(raw);
}

function saveState(state) {
  process.stdout.write('OUTPUT_STATE:' + JSON.stringify(state) + '\n');
}

module.exports = { loadState, saveState, load_state: loadState, save_state: saveState };
