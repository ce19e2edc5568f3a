// Validate an AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser).
//
//   node infra/asyncapi/validate.mjs infra/asyncapi.yaml
//
// Prints one JSON object on stdout: {"valid": bool, "version": "3.0.0", "diagnostics": [...]},
// each diagnostic with its severity name, rule code, message and path. Exits 1 when the parser
// returns no document or reports any error-level diagnostic, 2 on bad usage, 0 otherwise
// (warnings and hints are reported, not fatal).
import { resolve } from 'node:path';
import { DiagnosticSeverity, Parser, fromFile } from '@asyncapi/parser';

const SEVERITY = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'information',
  [DiagnosticSeverity.Hint]: 'hint',
};

const source = process.argv[2];
if (!source) {
  process.stderr.write('usage: node validate.mjs <asyncapi.yaml>\n');
  process.exit(2);
}

const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, resolve(source)).parse();
const reported = diagnostics.map((d) => ({
  severity: SEVERITY[d.severity] ?? String(d.severity),
  code: String(d.code),
  message: d.message,
  path: d.path.join('.'),
}));
const errors = reported.filter((d) => d.severity === 'error');
const valid = document !== undefined && errors.length === 0;
process.stdout.write(`${JSON.stringify({ valid, version: document?.version() ?? null, diagnostics: reported })}\n`);
process.exit(valid ? 0 : 1);
