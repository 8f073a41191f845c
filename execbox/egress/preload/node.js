'use strict';
// execbox egress preload for Node (loaded with NODE_OPTIONS=--require ...).
// Node 18/20 ignore HTTP(S)_PROXY: this makes http, https and fetch tunnel through
// the egress proxy named by HTTPS_PROXY/HTTP_PROXY. It is a convenience, not the
// boundary: code that bypasses it reaches nothing, because the kernel lets the
// sandbox talk to the proxy port and nowhere else.
(function () {
  const env = process.env;
  const proxyUrl = env.HTTPS_PROXY || env.https_proxy || env.HTTP_PROXY || env.http_proxy;
  if (!proxyUrl) return;
  let proxy;
  try { proxy = new URL(proxyUrl); } catch (e) { return; }
  const net = require('net');
  const tls = require('tls');
  // NODE_EXTRA_CA_CERTS is read when node starts, and a runtime started before the run
  // (the warm pool) started without it: trust the proxy's CA in every TLS context made
  // from now on (a certificate already in the store is not added twice).
  if (env.NODE_EXTRA_CA_CERTS) {
    let pem = null;
    try { pem = require('fs').readFileSync(env.NODE_EXTRA_CA_CERTS, 'utf8'); } catch (e) { pem = null; }
    if (pem) {
      const createSecureContext = tls.createSecureContext;
      tls.createSecureContext = function (options) {
        const ctx = createSecureContext.call(this, options);
        ctx.context.addCACert(pem);
        return ctx;
      };
    }
  }
  const http = require('http');
  const https = require('https');
  const proxyHost = proxy.hostname.replace(/^\[|\]$/g, '');
  const proxyPort = Number(proxy.port) || 80;
  const auth = proxy.username
    ? 'Basic ' + Buffer.from(decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password)).toString('base64')
    : null;
  const noProxy = (env.NO_PROXY || env.no_proxy || '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);

  function bypass(host) {
    host = String(host || '').toLowerCase().replace(/^\[|\]$/g, '');
    if (host === proxyHost) return true;
    return noProxy.some((p) => p === '*' || host === p || host.endsWith(p.startsWith('.') ? p : '.' + p));
  }

  // A CONNECT tunnel through the proxy; cb(err, socket).
  function tunnel(host, port, cb) {
    const sock = net.connect(proxyPort, proxyHost);
    let buf = Buffer.alloc(0);
    let done = false;
    const finish = (err, s) => {
      if (done) return;
      done = true;
      sock.removeListener('data', onData);
      sock.removeListener('error', onError);
      sock.removeListener('close', onClose);
      if (err) { sock.destroy(); cb(err); } else cb(null, s);
    };
    const onError = (err) => finish(err);
    const onClose = () => finish(new Error('egress proxy closed the connection'));
    function onData(chunk) {
      buf = Buffer.concat([buf, chunk]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) {
        if (buf.length > 65536) finish(new Error('egress proxy sent an oversized reply'));
        return;
      }
      const head = buf.subarray(0, end).toString('latin1');
      const status = Number(head.split(' ')[1]);
      const rest = buf.subarray(end + 4);
      if (status !== 200) {
        const m = /x-execbox-denied:\s*([^\r\n]*)/i.exec(head);
        const err = new Error('egress proxy refused ' + host + ':' + port + ': ' + head.split('\r\n')[0] + (m ? ' (' + m[1] + ')' : ''));
        err.code = 'EEGRESS';
        finish(err);
        return;
      }
      if (rest.length) sock.unshift(rest);
      finish(null, sock);
    }
    sock.on('data', onData);
    sock.on('error', onError);
    sock.on('close', onClose);
    sock.once('connect', () => {
      const target = net.isIPv6(host) ? '[' + host + ']:' + port : host + ':' + port;
      sock.write('CONNECT ' + target + ' HTTP/1.1\r\nHost: ' + target + '\r\n' + (auth ? 'Proxy-Authorization: ' + auth + '\r\n' : '') + '\r\n');
    });
  }

  function tunnelAgent(Base, secure) {
    return class extends Base {
      createConnection(options, cb) {
        const host = options.host || options.hostname || 'localhost';
        const port = Number(options.port) || (secure ? 443 : 80);
        if (bypass(host) || options.socketPath) return Base.prototype.createConnection.call(this, options, cb);
        tunnel(host, port, (err, sock) => {
          if (err) return cb(err);
          if (!secure) return cb(null, sock);
          const servername = options.servername || (net.isIP(host) ? undefined : host);
          cb(null, tls.connect(Object.assign({}, options, { socket: sock, servername })));
        });
        return undefined;
      }
    };
  }

  const HttpAgent = tunnelAgent(http.Agent, false);
  const HttpsAgent = tunnelAgent(https.Agent, true);
  http.globalAgent = new HttpAgent();
  https.globalAgent = new HttpsAgent();

  // fetch (undici, bundled in Node): swap its global dispatcher for one whose
  // connector tunnels, the first time fetch is called (loading undici is not free).
  const originalFetch = globalThis.fetch;
  if (typeof originalFetch !== 'function') return;
  const dispatcherKey = Symbol.for('undici.globalDispatcher.1');
  let installed = false;
  function connector(opts, cb) {
    const host = opts.hostname;
    const secure = opts.protocol === 'https:';
    const port = Number(opts.port) || (secure ? 443 : 80);
    let called = false;
    const once = (err, s) => { if (!called) { called = true; cb(err, s); } };
    const upgrade = (sock) => {
      if (!secure) return once(null, sock);
      const t = tls.connect({ socket: sock, servername: opts.servername || (net.isIP(host) ? undefined : host), ALPNProtocols: ['http/1.1'] });
      t.once('secureConnect', () => once(null, t));
      t.once('error', (e) => once(e));
    };
    if (bypass(host)) {
      const s = net.connect(port, host);
      s.once('connect', () => upgrade(s));
      s.once('error', (e) => once(e));
      return;
    }
    tunnel(host, port, (err, sock) => (err ? once(err) : upgrade(sock)));
  }
  function install() {
    installed = true;
    try {
      originalFetch('data:,').catch(() => {}); // loads undici, which creates its default dispatcher
      const current = globalThis[dispatcherKey];
      if (current && typeof current.constructor === 'function') {
        globalThis[dispatcherKey] = new current.constructor({ connect: connector });
      }
    } catch (e) {
      // Leave fetch as it is: without the tunnel it simply reaches nothing.
    }
  }
  Object.defineProperty(globalThis, 'fetch', {
    configurable: true,
    enumerable: true,
    writable: true,
    value: function fetch(input, init) {
      if (!installed) install();
      return originalFetch(input, init);
    },
  });
})();
