//! `trellis export`: a mesh compiled once, every class's resources written
//! to one JSON file, so another xDS server can serve exactly what Trellis
//! serves (the go-control-plane peer of `benches/peers/` loads it).

use std::{collections::BTreeMap, io::Write as _, path::PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde::Serialize;
use trellis_shared::{type_url, Snapshot};

/// The first field of the file: readers refuse any other.
const FORMAT: &str = "trellis-export 1";

#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// Directory of Kubernetes YAML.
    #[arg(long, default_value = "examples/bookstore")]
    dir: PathBuf,
    /// Mesh name.
    #[arg(long, default_value = "osm")]
    mesh: String,
    /// Where to write the export.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Serialize)]
struct Export<'a> {
    format: &'static str,
    /// Each class's Envoy resources, by class id (a proxy's class is its
    /// `node.cluster` in the load test).
    classes: BTreeMap<&'a str, Vec<ExportedResource<'a>>>,
}

#[derive(Serialize)]
struct ExportedResource<'a> {
    type_url: &'a str,
    name: &'a str,
    version: String,
    /// The resource's `google.protobuf.Any`, base64.
    any: String,
}

pub(crate) fn export(args: ExportArgs) -> Result<()> {
    let (snapshot, _) = super::compile_once(&args.dir, &args.mesh)?;
    let export = collect(&snapshot)?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut writer, &export)?;
    writer
        .flush()
        .with_context(|| format!("writing {}", args.out.display()))?;
    let resources: usize = export.classes.values().map(Vec::len).sum();
    println!(
        "exported {} classes, {resources} resources, to {}",
        export.classes.len(),
        args.out.display()
    );
    Ok(())
}

/// Every class's resources, as a proxy of that class would receive them.
fn collect(snapshot: &Snapshot) -> Result<Export<'_>> {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut classes = BTreeMap::new();
    for class in snapshot.class_names() {
        let Some(manifest) = snapshot.manifest(class) else {
            continue;
        };
        let mut resources = Vec::new();
        for (scope, type_name, name) in manifest.refs() {
            // The class manifest itself and bindings are Trellis's own.
            if !matches!(
                type_url::short_name(type_name),
                "lds" | "rds" | "cds" | "eds" | "sds"
            ) {
                continue;
            }
            let Some(resource) = snapshot.get(scope, type_name, name) else {
                bail!("class {class} references {type_name} {name}, which the snapshot lacks");
            };
            resources.push(ExportedResource {
                type_url: type_name,
                name,
                version: resource.version().to_string(),
                any: base64.encode(resource.any()),
            });
        }
        classes.insert(&**class, resources);
    }
    if classes.is_empty() {
        bail!("the mesh compiled to no classes: nothing to export");
    }
    Ok(Export {
        format: FORMAT,
        classes,
    })
}
