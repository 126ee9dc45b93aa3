//! The job queue's Salesforce schema (`crm/salesforce`, Salesforce DX source format) against the
//! contract (`src/crm/contract.rs`): one source of truth, checked both ways (every object, field
//! and picklist value the contract names is in the metadata with a compatible type, and the
//! metadata holds nothing else); the permission sets grant what the operator and the people who
//! queue jobs need and no more; and Salesforce's own library (`@salesforce/source-deploy-retrieve`,
//! what `sf project convert source` runs) converts the project to Metadata API format, offline.
//! `tests/salesforce-schema/install.sh` installs that library (`make test` runs it first).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use connection_operator::crm::MAX_RESULT;
use connection_operator::crm::contract::{JobStatus, PROCESSOR_CLOUD, salesforce as sf};
use connection_operator::retriever::plan::MAX_CLAIMANT;

const PROJECT: &str = "crm/salesforce";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn source() -> PathBuf {
    root().join(PROJECT).join("force-app/main/default")
}

/// The text of each direct child element of `node`, by tag (the last one wins).
fn children<'a>(node: roxmltree::Node<'a, 'a>) -> std::collections::BTreeMap<&'a str, &'a str> {
    node.children()
        .filter(|c| c.is_element())
        .map(|c| (c.tag_name().name(), c.text().unwrap_or("").trim()))
        .collect()
}

struct Field {
    kind: String,
    length: Option<u64>,
    scale: Option<u64>,
    restricted: bool,
    values: Vec<String>,
    default: Option<String>,
}

fn field(name: &str) -> Field {
    let path = source().join(format!("objects/{}/fields/{name}.field-meta.xml", sf::OBJECT));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let top = children(doc.root_element());
    assert_eq!(top.get("fullName").copied(), Some(name), "{}", path.display());
    let number = |key: &str| top.get(key).map(|v| v.parse::<u64>().unwrap());
    let value_set = doc.descendants().find(|n| n.has_tag_name("valueSet"));
    let values: Vec<(String, bool)> = doc
        .descendants()
        .filter(|n| {
            n.has_tag_name("value") && n.parent().is_some_and(|p| p.has_tag_name("valueSetDefinition"))
        })
        .map(|v| {
            let c = children(v);
            (c["fullName"].to_string(), c.get("default") == Some(&"true"))
        })
        .collect();
    Field {
        kind: top["type"].to_string(),
        length: number("length"),
        scale: number("scale"),
        restricted: value_set.is_some_and(|v| children(v).get("restricted") == Some(&"true")),
        default: values.iter().find(|(_, d)| *d).map(|(v, _)| v.clone()),
        values: values.into_iter().map(|(v, _)| v).collect(),
    }
}

#[test]
fn the_salesforce_schema_holds_exactly_the_contracts_object_and_fields() {
    let object_dir = source().join("objects").join(sf::OBJECT);
    assert!(
        object_dir
            .join(format!("{}.object-meta.xml", sf::OBJECT))
            .is_file(),
        "the contract's object {} has its metadata",
        sf::OBJECT
    );
    // The reverse: every field file is a field of the contract.
    let files: BTreeSet<String> = std::fs::read_dir(object_dir.join("fields"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".field-meta.xml").unwrap_or(&name).to_string()
        })
        .collect();
    let contract: BTreeSet<String> = sf::FIELDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(files, contract, "the metadata's fields are the contract's");

    let status = field(sf::STATUS);
    assert_eq!((status.kind.as_str(), status.restricted), ("Picklist", true));
    let statuses: Vec<&str> = JobStatus::ALL.iter().map(|s| s.salesforce()).collect();
    assert_eq!(
        status.values, statuses,
        "the seven status values, in lifecycle order"
    );
    assert_eq!(status.default.as_deref(), Some(JobStatus::Holding.salesforce()));

    let processor = field(sf::PROCESSOR);
    assert_eq!(
        (processor.kind.as_str(), processor.restricted),
        ("Picklist", true)
    );
    assert_eq!(processor.values, ["Cloud", "Desktop", "Server"]);
    assert_eq!(processor.default.as_deref(), Some(PROCESSOR_CLOUD));

    // Text long enough for what is written or accepted: a type of up to 80 characters (longer
    // rows are skipped), a claimant of up to MAX_CLAIMANT, a result of up to MAX_RESULT.
    let job_type = field(sf::TYPE);
    assert_eq!(job_type.kind, "Text");
    assert!(job_type.length.unwrap() >= 80);
    let claimed_by = field(sf::CLAIMED_BY);
    assert_eq!(claimed_by.kind, "Text");
    assert!(claimed_by.length.unwrap() >= MAX_CLAIMANT as u64);
    let result = field(sf::RESULT);
    assert_eq!(result.kind, "LongTextArea");
    assert!(result.length.unwrap() >= MAX_RESULT as u64);
    for time in [sf::CLAIM_EXPIRES, sf::STARTED, sf::ENDED] {
        assert_eq!(field(time).kind, "DateTime", "{time}");
    }
    let attempt = field(sf::ATTEMPT);
    assert_eq!((attempt.kind.as_str(), attempt.scale), ("Number", Some(0)));
}

/// An object permission's settings, by name.
type ObjectPermissions = std::collections::BTreeMap<String, String>;
/// Field permissions: (`Object.Field`, readable, editable).
type FieldPermissions = Vec<(String, bool, bool)>;

/// A permission set's object permissions and its field permissions.
fn permission_set(name: &str) -> (ObjectPermissions, FieldPermissions) {
    let path = source().join(format!("permissionsets/{name}.permissionset-meta.xml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = roxmltree::Document::parse(&text).unwrap();
    let objects: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("objectPermissions"))
        .collect();
    assert_eq!(objects.len(), 1, "{name}: one object");
    let object: ObjectPermissions = children(objects[0])
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(object["object"], sf::OBJECT);
    let fields = doc
        .descendants()
        .filter(|n| n.has_tag_name("fieldPermissions"))
        .map(|n| {
            let c = children(n);
            (
                c["field"].to_string(),
                c["readable"] == "true",
                c["editable"] == "true",
            )
        })
        .collect();
    (object, fields)
}

#[test]
fn the_integration_users_permission_set_grants_what_the_operator_does_and_no_more() {
    let (object, fields) = permission_set("CrmJob_Cloud_Processor");
    for (key, want) in [
        ("allowRead", "true"),
        ("allowEdit", "true"),
        ("allowCreate", "false"),
        ("allowDelete", "false"),
        ("viewAllRecords", "false"),
        ("modifyAllRecords", "false"),
    ] {
        assert_eq!(object[key], want, "{key}");
    }
    let mut seen = BTreeSet::new();
    for (field, readable, editable) in fields {
        let name = field
            .strip_prefix(&format!("{}.", sf::OBJECT))
            .unwrap()
            .to_string();
        assert!(readable, "{name} readable");
        assert_eq!(
            editable,
            sf::WRITTEN.contains(&name.as_str()),
            "{name}: editable only if written"
        );
        seen.insert(name);
    }
    let all: BTreeSet<String> = sf::FIELDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(seen, all, "every field of the contract has a permission");

    // The people who queue jobs: create, and set the type, processor and status (an abort), but
    // never a claim, a lease or an outcome.
    let (object, fields) = permission_set("CrmJob_Submitter");
    assert_eq!(
        (object["allowCreate"].as_str(), object["allowDelete"].as_str()),
        ("true", "false")
    );
    for (field, readable, editable) in fields {
        let name = field.strip_prefix(&format!("{}.", sf::OBJECT)).unwrap();
        assert!(readable, "{name}");
        assert_eq!(
            editable,
            [sf::TYPE, sf::PROCESSOR, sf::STATUS].contains(&name),
            "{name}"
        );
    }
}

#[test]
fn salesforces_own_library_converts_the_project_to_metadata_format() {
    let tool = root().join("tests/salesforce-schema");
    assert!(
        tool.join("node_modules/@salesforce/source-deploy-retrieve")
            .is_dir(),
        "Salesforce's library is not installed: run tests/salesforce-schema/install.sh (make test does)"
    );
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new("node")
        .arg(tool.join("convert.mjs"))
        .arg(root().join(PROJECT))
        .arg(out.path())
        .output()
        .expect("node (Node.js 20+) runs the converter");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let components: BTreeSet<&str> = stdout.lines().filter(|l| l.contains(':')).collect();
    let mut want = vec![
        format!("CustomObject:{}", sf::OBJECT),
        format!("CustomTab:{}", sf::OBJECT),
        "PermissionSet:CrmJob_Cloud_Processor".to_string(),
        "PermissionSet:CrmJob_Submitter".to_string(),
    ];
    want.extend(
        sf::FIELDS
            .iter()
            .map(|f| format!("CustomField:{}.{f}", sf::OBJECT)),
    );
    want.extend(["All", "Holding", "Running", "Failed"].map(|v| format!("ListView:{}.{v}", sf::OBJECT)));
    for w in &want {
        assert!(components.contains(w.as_str()), "{w} in {components:?}");
    }
    let package = std::fs::read_to_string(out.path().join("package.xml")).unwrap();
    let doc = roxmltree::Document::parse(&package).unwrap();
    let version = doc
        .descendants()
        .find(|n| n.has_tag_name("version"))
        .and_then(|n| n.text())
        .unwrap();
    assert_eq!(
        format!("/services/data/v{version}"),
        sf::API_PATH,
        "the contract's API version"
    );
    let members: BTreeSet<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("members"))
        .filter_map(|n| n.text())
        .collect();
    for f in sf::FIELDS {
        assert!(
            members.contains(format!("{}.{f}", sf::OBJECT).as_str()),
            "{f} in package.xml"
        );
    }
    let object = std::fs::read_to_string(out.path().join(format!("objects/{}.object", sf::OBJECT))).unwrap();
    assert!(
        roxmltree::Document::parse(&object).is_ok(),
        "the converted object is well formed"
    );
}

/// The Dataverse definition (`crm/dataverse/table.json`, the Web API's EntityDefinitions bodies)
/// against the contract, both ways.
#[test]
fn the_dataverse_table_holds_exactly_the_contracts_columns() {
    use connection_operator::crm::contract::dataverse as dv;
    let text = std::fs::read_to_string(root().join("crm/dataverse/table.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prefix = doc["publisherPrefix"].as_str().unwrap();
    assert!(dv::TABLE.starts_with(&format!("{prefix}_")));
    let entity = &doc["entity"];
    assert_eq!(entity["@odata.type"], "Microsoft.Dynamics.CRM.EntityMetadata");
    let logical = |v: &serde_json::Value| v["SchemaName"].as_str().unwrap().to_ascii_lowercase();
    assert_eq!(logical(entity), dv::TABLE);
    // The entity set and key the Web API derives from the logical name are the contract's.
    assert_eq!(format!("{}s", dv::TABLE), dv::ENTITY_SET);
    assert_eq!(format!("{}id", dv::TABLE), dv::ID);
    let primary = entity["Attributes"].as_array().unwrap();
    assert_eq!(primary.len(), 1, "the primary name column only");
    assert_eq!(primary[0]["IsPrimaryName"], true);
    assert_eq!(
        primary[0]["@odata.type"],
        "Microsoft.Dynamics.CRM.StringAttributeMetadata"
    );

    let attributes = doc["attributes"].as_array().unwrap();
    let by_name: std::collections::BTreeMap<String, &serde_json::Value> =
        attributes.iter().map(|a| (logical(a), a)).collect();
    assert_eq!(by_name.len(), attributes.len(), "no column twice");
    let names: BTreeSet<String> = by_name.keys().cloned().collect();
    let contract: BTreeSet<String> = dv::FIELDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(names, contract, "the table's columns are the contract's");
    for a in attributes {
        assert!(
            a["SchemaName"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{prefix}_")),
            "{a}"
        );
    }
    let kind = |name: &str| {
        by_name[name]["@odata.type"]
            .as_str()
            .unwrap()
            .trim_start_matches("Microsoft.Dynamics.CRM.")
    };
    let max = |name: &str| by_name[name]["MaxLength"].as_u64().unwrap();

    assert_eq!(kind(dv::STATUS), "PicklistAttributeMetadata");
    let options = by_name[dv::STATUS]["OptionSet"]["Options"].as_array().unwrap();
    let values: Vec<(i64, &str)> = options
        .iter()
        .map(|o| {
            (
                o["Value"].as_i64().unwrap(),
                o["Label"]["LocalizedLabels"][0]["Label"].as_str().unwrap(),
            )
        })
        .collect();
    let want: Vec<(i64, &str)> = JobStatus::ALL
        .iter()
        .map(|s| (s.dataverse(), s.salesforce()))
        .collect();
    assert_eq!(values, want, "the seven status choices, 1 to 7");
    assert_eq!(
        by_name[dv::STATUS]["DefaultFormValue"],
        JobStatus::Holding.dataverse()
    );

    // The processor is compared as text (`crmc_processor eq 'Cloud'`).
    assert_eq!(kind(dv::PROCESSOR), "StringAttributeMetadata");
    assert!(max(dv::PROCESSOR) as usize >= PROCESSOR_CLOUD.len());
    assert_eq!(kind(dv::TYPE), "StringAttributeMetadata");
    assert!(max(dv::TYPE) >= 80);
    assert_eq!(kind(dv::CLAIMED_BY), "StringAttributeMetadata");
    assert!(max(dv::CLAIMED_BY) >= MAX_CLAIMANT as u64);
    assert_eq!(kind(dv::RESULT), "MemoAttributeMetadata");
    assert!(max(dv::RESULT) >= MAX_RESULT as u64);
    for time in [dv::CLAIM_EXPIRES, dv::STARTED, dv::ENDED] {
        assert_eq!(kind(time), "DateTimeAttributeMetadata", "{time}");
        assert_eq!(by_name[time]["Format"], "DateAndTime", "{time}");
    }
    assert_eq!(kind(dv::ATTEMPT), "IntegerAttributeMetadata");
}
