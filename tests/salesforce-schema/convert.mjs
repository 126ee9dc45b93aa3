// Converts a Salesforce DX project (its sfdx-project.json, package directories and sourceApiVersion)
// to Metadata API format with Salesforce's own library (@salesforce/source-deploy-retrieve, what
// `sf project convert source` uses), without an org. Prints each component as `Type:FullName`,
// then `converted <package.xml path>`; exits 1 with the library's error otherwise.
// Usage: node convert.mjs PROJECT_DIR OUTPUT_DIR
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ComponentSet, MetadataConverter } from '@salesforce/source-deploy-retrieve';

const [project, output] = process.argv.slice(2);
if (!project || !output) {
  console.error('usage: node convert.mjs PROJECT_DIR OUTPUT_DIR');
  process.exit(2);
}
try {
  const config = JSON.parse(readFileSync(join(project, 'sfdx-project.json'), 'utf8'));
  const set = ComponentSet.fromSource(config.packageDirectories.map((p) => join(project, p.path)));
  set.sourceApiVersion = config.sourceApiVersion;
  set.apiVersion = config.sourceApiVersion;
  for (const c of set.getSourceComponents().toArray()) {
    console.log(`${c.type.name}:${c.fullName}`);
    for (const child of c.getChildren()) console.log(`${child.type.name}:${child.fullName}`);
  }
  const result = await new MetadataConverter().convert(set, 'metadata', {
    type: 'directory',
    outputDirectory: output,
    genUniqueDir: false,
  });
  console.log(`converted ${join(result.packagePath, 'package.xml')}`);
} catch (e) {
  console.error(`conversion failed: ${e.name}: ${e.message}`);
  process.exit(1);
}
