// Loaded once by warm_node.js before the request, to warm the module loader.
'use strict';
