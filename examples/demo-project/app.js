// The demo app: requires its dependencies from node_modules, which velo mounts.
const leftPad = require('left-pad');
console.log(leftPad('velo', 8, '.'), 'run by uid', process.getuid());
