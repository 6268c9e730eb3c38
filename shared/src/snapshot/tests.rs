#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use trellis_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

use super::*;
use crate::{ClassDelta, ClassManifest};

fn cla(name: &str, tweak: u32) -> Resource {
    Resource::encode(
        type_url::ENDPOINT,
        &ClusterLoadAssignment {
            cluster_name: format!("{name}#{tweak}"),
            ..Default::default()
        },
    )
    .unwrap()
}

fn service(i: usize) -> Scope {
    Scope::Service(format!("ns/svc-{i}").into())
}

/// A snapshot of `n` services, one assignment each.
fn services(n: usize) -> Snapshot {
    let mut builder = Snapshot::empty().to_builder();
    for i in 0..n {
        builder
            .insert(
                service(i),
                type_url::ENDPOINT,
                "cla",
                cla(&i.to_string(), 0),
            )
            .unwrap();
    }
    builder.build().unwrap()
}

fn names(list: &[Arc<str>]) -> Vec<&str> {
    list.iter().map(|n| &**n).collect()
}

#[test]
fn deriving_shares_every_untouched_scope() {
    let parent = services(1000);
    let mut builder = parent.to_builder();
    builder
        .insert(service(7), type_url::ENDPOINT, "cla", cla("7", 1))
        .unwrap();
    let child = builder.build().unwrap();
    for i in (0..1000).filter(|i| *i != 7) {
        let a = parent
            .scopes
            .get(&service(i))
            .unwrap()
            .types
            .as_ref()
            .unwrap();
        let b = child
            .scopes
            .get(&service(i))
            .unwrap()
            .types
            .as_ref()
            .unwrap();
        assert!(a.ptr_eq(b), "scope {i} was copied");
    }
    let a = parent
        .scopes
        .get(&service(7))
        .unwrap()
        .types
        .as_ref()
        .unwrap();
    let b = child
        .scopes
        .get(&service(7))
        .unwrap()
        .types
        .as_ref()
        .unwrap();
    assert!(!a.ptr_eq(b));
}

#[test]
fn diff_reports_changed_and_removed_names_per_scope_and_type() {
    let parent = services(10);
    let mut builder = parent.to_builder();
    builder
        .insert(service(1), type_url::ENDPOINT, "cla", cla("1", 1))
        .unwrap();
    builder
        .insert(service(1), type_url::ENDPOINT, "new", cla("n", 0))
        .unwrap();
    builder.remove(&service(2), type_url::ENDPOINT, "cla");
    let child = builder.build().unwrap();
    let diff = child.diff_from(&parent);
    assert_eq!(diff.scopes.len(), 2);
    assert_eq!(diff.scopes[0].scope, service(1));
    assert_eq!(names(&diff.scopes[0].types[0].changed), ["cla", "new"]);
    assert!(diff.scopes[0].types[0].removed.is_empty());
    assert_eq!(diff.scopes[1].scope, service(2));
    assert_eq!(names(&diff.scopes[1].types[0].removed), ["cla"]);
}

#[test]
fn diff_spans_several_epochs_and_sees_removed_scopes() {
    let first = services(5);
    let mut builder = first.to_builder();
    builder
        .insert(service(1), type_url::ENDPOINT, "cla", cla("1", 1))
        .unwrap();
    let second = builder.build().unwrap();
    let mut builder = second.to_builder();
    builder.remove_scope(&service(3));
    builder
        .insert(service(1), type_url::ENDPOINT, "cla", cla("1", 2))
        .unwrap();
    let third = builder.build().unwrap();
    let diff = third.diff_from(&first);
    let scopes: Vec<&Scope> = diff.scopes.iter().map(|s| &s.scope).collect();
    assert_eq!(scopes, [&service(1), &service(3)]);
    assert_eq!(third.scope_count(), 4);
    assert!(third.diff_from(&third).scopes.is_empty());
}

#[test]
fn diff_visits_only_the_log_of_changed_scopes() {
    let parent = services(10_000);
    let mut builder = parent.to_builder();
    builder
        .insert(service(42), type_url::ENDPOINT, "cla", cla("42", 1))
        .unwrap();
    let child = builder.build().unwrap();
    let since: Vec<&Scope> = child
        .log
        .range((
            Bound::Included((parent.epoch + 1, Scope::min())),
            Bound::Unbounded,
        ))
        .map(|((_, s), ())| s)
        .collect();
    assert_eq!(since, [&service(42)]);
}

#[test]
fn diff_between_unrelated_snapshots_compares_everything() {
    let a = services(3);
    let mut builder = services(3).to_builder();
    builder
        .insert(service(0), type_url::ENDPOINT, "cla", cla("0", 9))
        .unwrap();
    let b = builder.build().unwrap();
    let diff = b.diff_from(&a);
    assert_eq!(diff.scopes.len(), 1);
    assert_eq!(diff.scopes[0].scope, service(0));
}

#[test]
fn inserting_the_same_version_changes_nothing() {
    let parent = services(3);
    let mut builder = parent.to_builder();
    builder
        .insert(service(0), type_url::ENDPOINT, "cla", cla("0", 0))
        .unwrap();
    let child = builder.build().unwrap();
    assert!(child.diff_from(&parent).scopes.is_empty());
}

fn class_snapshot(base: &Snapshot, class: &str, refs: &[(Scope, &str)]) -> Snapshot {
    class_snapshot_result(base, class, refs).unwrap()
}

#[test]
fn class_manifest_round_trips_through_its_resource() {
    let mut manifest = ClassManifest::default();
    manifest
        .insert(service(1), type_url::ENDPOINT, "a")
        .unwrap();
    manifest
        .insert(Scope::Class("c".into()), type_url::CLUSTER, "a")
        .unwrap();
    let decoded = ClassManifest::from_resource(&manifest.to_resource().unwrap()).unwrap();
    assert_eq!(decoded, manifest);
    assert!(
        manifest
            .insert(service(2), type_url::ENDPOINT, "a")
            .is_err(),
        "duplicate name"
    );
}

#[test]
fn a_class_referencing_a_missing_resource_is_refused() {
    let error = class_snapshot_result(&services(1), "web", &[(service(5), "cla")]).unwrap_err();
    assert!(
        matches!(error, SnapshotError::DanglingReference { .. }),
        "{error}"
    );
    let mut builder = services(1).to_builder();
    let manifest = ClassManifest::default().to_resource().unwrap();
    let misplaced = builder.insert(service(0), type_url::PROXY_CLASS, "web", manifest);
    assert!(matches!(
        misplaced,
        Err(SnapshotError::MisplacedClass { .. })
    ));
}

fn class_snapshot_result(
    base: &Snapshot,
    class: &str,
    refs: &[(Scope, &str)],
) -> Result<Snapshot, SnapshotError> {
    let mut manifest = ClassManifest::default();
    for (scope, name) in refs {
        manifest
            .insert(scope.clone(), type_url::ENDPOINT, name)
            .unwrap();
    }
    let mut builder = base.to_builder();
    builder.insert(
        Scope::Class(class.into()),
        type_url::PROXY_CLASS,
        class,
        manifest.to_resource().unwrap(),
    )?;
    builder.build()
}

#[test]
fn class_delta_follows_only_the_scopes_a_class_references() {
    let base = class_snapshot(&services(4), "web", &[(service(1), "cla")]);
    let mut builder = base.to_builder();
    builder
        .insert(service(1), type_url::ENDPOINT, "cla", cla("1", 1))
        .unwrap();
    builder
        .insert(service(3), type_url::ENDPOINT, "cla", cla("3", 1))
        .unwrap();
    let next = builder.build().unwrap();
    let delta = ClassDelta::between(&base, &next, &next.diff_from(&base), "web");
    let eds = &delta.types[type_url::ENDPOINT];
    assert_eq!(eds.changed.len(), 1);
    assert_eq!(&*eds.changed[0].0, "cla");
    assert_eq!(eds.changed[0].1, cla("1", 1));
    assert!(ClassDelta::between(&base, &next, &next.diff_from(&base), "other").is_empty());
}

#[test]
fn class_delta_compares_whole_views_when_the_manifest_changes() {
    let base = class_snapshot(&services(3), "web", &[(service(0), "cla")]);
    let mut builder = base.to_builder();
    builder
        .insert(service(2), type_url::ENDPOINT, "other", cla("x", 0))
        .unwrap();
    let with_other = builder.build().unwrap();
    let next = class_snapshot(&with_other, "web", &[(service(2), "other")]);
    let delta = ClassDelta::between(&base, &next, &next.diff_from(&base), "web");
    let eds = &delta.types[type_url::ENDPOINT];
    assert_eq!(
        eds.changed.iter().map(|(n, _)| &**n).collect::<Vec<_>>(),
        ["other"]
    );
    assert_eq!(names(&eds.removed), ["cla"]);
    let view = next.class("web");
    assert!(view.exists());
    assert_eq!(view.get(type_url::ENDPOINT, "other"), Some(&cla("x", 0)));
    assert_eq!(view.iter(type_url::ENDPOINT).count(), 1);
}
