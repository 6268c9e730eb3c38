//! Property tests: one field of one manifest of the bookstore (and of the
//! policy kinds' fixtures) replaced by an extreme or malformed value, then
//! read and compiled. Whatever the value: nothing panics, compiling is
//! deterministic, every problem names an object of the mesh, and an
//! all-or-nothing object (the SMI and policy kinds) that is reported is
//! kept out whole: the mesh compiles as if it were absent.
//!
//! CI runs 64 cases; a longer run:
//! `PROPTEST_CASES=5000 cargo test --release -p trellis-leader --test properties`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mutate;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, OnceLock},
};

use proptest::prelude::*;
use serde_json::{json, Value};
use trellis_leader::{
    ca::BuiltinCa,
    catalog,
    compile::{Compiled, Compiler},
    kinds::{Object, ObjectRef},
};
use trellis_shared::type_url;

/// Every manifest of the example and of the policy fixtures.
fn manifests() -> &'static [Value] {
    static MANIFESTS: OnceLock<Vec<Value>> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<_> = std::fs::read_dir(root.join("../examples/bookstore"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.push(root.join("tests/fixtures/deploy/policies.yaml"));
        files
            .iter()
            .flat_map(|file| {
                let text = std::fs::read_to_string(file).unwrap();
                serde_saphyr::from_multiple::<Value>(&text).unwrap()
            })
            .filter(|doc| Object::from_manifest(doc.clone()).is_ok())
            .collect()
    })
}

fn objects(docs: &[Value]) -> BTreeMap<ObjectRef, Object> {
    docs.iter()
        .map(|doc| {
            let object = Object::from_manifest(doc.clone()).unwrap();
            (object.object_ref(), object)
        })
        .collect()
}

/// Values that have broken parsers and arithmetic elsewhere.
fn extreme() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e300)),
        Just(json!(-1e-300)),
        Just(json!("")),
        Just(json!("*")),
        Just(json!("9999999999999999999h")),
        Just(json!("1e309s")),
        Just(json!("-5s")),
        Just(json!("2562047788015215h30m8s")),
        Just(json!("(")),
        Just(json!("/../")),
        Just(json!("x".repeat(70_000))),
        Just(json!("\u{1F980}\u{0}")),
        Just(Value::Null),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!([null, ""])),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u32>().prop_map(|n| json!(format!("{n}ms"))),
        "[a-z0-9./*-]{0,12}".prop_map(Value::String),
    ]
}

/// Everything compiled but the certificates (each compile has its own CA).
fn fingerprint(compiled: &Compiled) -> BTreeMap<String, String> {
    (compiled.resources.iter())
        .filter(|(key, _)| key.1 != type_url::SECRET)
        .map(|(key, resource)| (format!("{key:?}"), resource.version().to_string()))
        .collect()
}

fn compile(objects: &BTreeMap<ObjectRef, Object>) -> Compiled {
    let catalog = catalog::build(objects, "osm");
    Compiler::new(Arc::new(BuiltinCa::generate().unwrap()))
        .compile(&catalog)
        .clone()
}

/// Whether an invalid object of `kind` is skipped whole: the policy kinds,
/// but an UpstreamTrafficSetting, which may be reported for a part that has
/// no effect (an `httpRoutes` path matching no route) while the rest
/// applies.
fn all_or_nothing(kind: &str) -> bool {
    catalog::POLICY_KINDS.contains(&kind) && kind != "UpstreamTrafficSetting"
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn one_bad_field_never_panics_and_is_kept_out(
        doc in 0usize..1_000,
        path in 0usize..10_000,
        value in extreme(),
    ) {
        let docs = manifests();
        let doc = doc % docs.len();
        let mut all_paths = Vec::new();
        mutate::paths(&docs[doc], &mut Vec::new(), &mut all_paths);
        let path = &all_paths[path % all_paths.len()];
        let mut mutated = docs[doc].clone();
        mutate::replace(&mut mutated, path, value);
        let Ok(object) = Object::from_manifest(mutated) else {
            // The schema refuses it: the source reports the manifest.
            return Ok(());
        };
        let original = Object::from_manifest(docs[doc].clone()).unwrap().object_ref();
        let mut objects = objects(docs);
        objects.remove(&original);
        let without = objects.clone();
        let reference = object.object_ref();
        objects.insert(reference.clone(), object);

        let compiled = compile(&objects);
        prop_assert_eq!(fingerprint(&compiled), fingerprint(&compile(&objects)), "deterministic");
        let known: BTreeSet<String> = objects.keys().map(ToString::to_string).collect();
        for problem in &compiled.problems {
            prop_assert!(
                known.contains(&problem.object)
                    || problem.object.starts_with("class ")
                    || problem.object.starts_with("the ingress gateway"),
                "{} names no object of the mesh", problem.object
            );
        }
        let reported = compiled.problems.iter().any(|p| p.object == reference.to_string());
        if reported && all_or_nothing(reference.kind) {
            prop_assert_eq!(
                fingerprint(&compiled),
                fingerprint(&compile(&without)),
                "{} was reported but not kept out", reference
            );
        }
    }
}
