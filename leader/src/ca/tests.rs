use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::*;
use crate::catalog::Identity;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-ca-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A self-signed certificate and key, PEM, with the given validity and CA
/// flag.
fn pair(ca: bool, from: SystemTime, until: SystemTime) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["operator.example".to_owned()]).unwrap();
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params.not_before = from.into();
    params.not_after = until.into();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn valid_pair() -> (String, String) {
    let now = SystemTime::now();
    pair(
        true,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

fn provide(dir: &Path, cert: &str, key: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CA_CERT), cert).unwrap();
    std::fs::write(dir.join(CA_KEY), key).unwrap();
}

fn sans(pem: &str) -> (String, Vec<String>) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("dns:{dns}"),
            GeneralName::URI(uri) => format!("uri:{uri}"),
            other => format!("{other:?}"),
        })
        .collect();
    (cn, names)
}

#[test]
fn a_generated_root_is_kept_and_reloaded() {
    let dir = temp_dir("persist");
    let first = BuiltinCa::open(&dir).unwrap();
    let again = BuiltinCa::open(&dir).unwrap();
    assert_eq!(first.signer(), again.signer());
    assert_eq!(first.trust_bundle(), again.trust_bundle());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    }
}

#[test]
fn an_operator_root_signs_leaves_naming_the_identity() {
    let dir = temp_dir("operator");
    let (cert, key) = valid_pair();
    provide(&dir, &cert, &key);
    let ca = BuiltinCa::open(&dir).unwrap();
    assert_eq!(&*ca.trust_bundle(), cert.as_str());
    let identity = Identity::new("bookstore", "bookbuyer");
    let leaf = ca
        .issue(&LeafRequest::identity(
            &identity,
            "cluster.local",
            Duration::from_secs(600),
        ))
        .unwrap();
    assert!(
        leaf.chain_pem.ends_with(&cert),
        "the chain ends at the root"
    );
    let (cn, names) = sans(&leaf.chain_pem);
    assert_eq!(cn, "bookbuyer.bookstore.cluster.local");
    assert_eq!(
        names,
        [
            "dns:bookbuyer.bookstore.cluster.local",
            "uri:spiffe://cluster.local/ns/bookstore/sa/bookbuyer"
        ]
    );
    let proxy = ca
        .issue(&LeafRequest::proxy(
            "6a3e",
            &identity,
            "cluster.local",
            Duration::from_secs(600),
        ))
        .unwrap();
    assert_eq!(
        sans(&proxy.chain_pem).0,
        "6a3e.sidecar.bookbuyer.bookstore.cluster.local"
    );
    // A leaf never outlives its root.
    let long = ca
        .issue(&LeafRequest::identity(
            &identity,
            "cluster.local",
            Duration::from_secs(10 * 3600),
        ))
        .unwrap();
    assert!(long.not_after <= SystemTime::now() + Duration::from_secs(3600));
}

/// Opens `dir` expecting an error, and checks nothing was written.
fn refused(dir: &Path) -> CaError {
    let before: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    let error = BuiltinCa::open(dir).unwrap_err();
    let after: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "nothing written after {error}");
    error
}

#[test]
fn bad_operator_material_is_refused_with_its_reason() {
    let now = SystemTime::now();
    let (cert, key) = valid_pair();
    let (_, other_key) = valid_pair();

    let dir = temp_dir("mismatch");
    provide(&dir, &cert, &other_key);
    assert!(matches!(refused(&dir), CaError::KeyMismatch { .. }));

    let dir = temp_dir("expired");
    let (old, old_key) = pair(
        true,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    provide(&dir, &old, &old_key);
    let error = refused(&dir);
    assert!(matches!(error, CaError::OutsideValidity { .. }), "{error}");
    assert!(error.to_string().contains("not valid now"), "{error}");

    let dir = temp_dir("leaf");
    let (leaf, leaf_key) = pair(
        false,
        now - Duration::from_secs(60),
        now + Duration::from_secs(60),
    );
    provide(&dir, &leaf, &leaf_key);
    assert!(matches!(refused(&dir), CaError::NotCa { .. }));

    let dir = temp_dir("garbage");
    provide(&dir, "not a certificate", &key);
    assert!(matches!(refused(&dir), CaError::BadCertificate { .. }));

    let dir = temp_dir("badkey");
    provide(
        &dir,
        &cert,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    assert!(matches!(refused(&dir), CaError::BadKey { .. }));

    let dir = temp_dir("half");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CA_CERT), &cert).unwrap();
    let error = refused(&dir);
    assert!(matches!(error, CaError::HalfPair { .. }), "{error}");
    assert!(error.to_string().contains(CA_KEY), "{error}");

    let dir = temp_dir("unreadable");
    std::fs::create_dir_all(dir.join(CA_CERT)).unwrap();
    std::fs::write(dir.join(CA_KEY), &key).unwrap();
    let error = refused(&dir);
    assert!(matches!(error, CaError::Io { .. }), "{error}");
    assert!(error.to_string().contains(CA_CERT), "{error}");
}

#[test]
fn rotation_trusts_first_signs_second_and_drops_the_old_root_last() {
    let dir = temp_dir("rotate");
    let ca = BuiltinCa::open(&dir)
        .unwrap()
        .with_overlap(Duration::from_secs(10));
    let old_signer = ca.signer();
    let old_bundle = ca.trust_bundle();
    let t0 = SystemTime::now();
    assert!(!ca.advance(t0, true).unwrap(), "nothing to do");

    let next = RootCa::generate(Duration::from_secs(3600)).unwrap();
    let next_pem = next.cert_pem().to_owned();
    std::fs::write(dir.join(NEXT_CA_CERT), next.cert_pem()).unwrap();
    std::fs::write(dir.join(NEXT_CA_KEY), next.key_pem()).unwrap();

    assert!(ca.advance(t0, true).unwrap());
    assert_eq!(ca.phase(), RotationPhase::Trusting);
    assert_eq!(*ca.trust_bundle(), format!("{old_bundle}{next_pem}"));
    assert_eq!(ca.signer(), old_signer, "the old root still signs");

    let secs = |s| t0 + Duration::from_secs(s);
    assert!(!ca.advance(secs(5), true).unwrap(), "within the overlap");
    assert!(ca.advance(secs(10), true).unwrap());
    assert_eq!(ca.phase(), RotationPhase::Reissuing);
    assert_eq!(ca.signer(), next.id());
    assert!(ca
        .issue(&LeafRequest::server(
            "x",
            vec!["x".into()],
            Vec::new(),
            Duration::from_secs(60)
        ))
        .unwrap()
        .chain_pem
        .ends_with(&next_pem));

    assert!(!ca.advance(secs(100), false).unwrap(), "old leaves remain");
    assert!(
        !ca.advance(secs(101), true).unwrap(),
        "the overlap starts now"
    );
    assert!(!ca.advance(secs(110), true).unwrap());
    assert!(ca.advance(secs(111), true).unwrap());
    assert_eq!(ca.phase(), RotationPhase::Stable);
    assert_eq!(*ca.trust_bundle(), next_pem);

    assert!(!dir.join(NEXT_CA_CERT).exists());
    let reopened = BuiltinCa::open(&dir).unwrap();
    assert_eq!(
        reopened.signer(),
        next.id(),
        "the new root replaced the old on disk"
    );
}

#[test]
fn renewal_falls_between_seven_and_nine_twelfths_of_life() {
    let ca = BuiltinCa::generate().unwrap();
    let request = LeafRequest::identity(
        &Identity::new("ns", "sa"),
        "cluster.local",
        Duration::from_secs(1200),
    );
    let cert = ca.issue(&request).unwrap();
    let times: Vec<Duration> = (0..200)
        .map(|_| renewal_time(&cert).duration_since(cert.issued_at).unwrap())
        .collect();
    assert!(times
        .iter()
        .all(|t| *t >= Duration::from_secs(700) && *t <= Duration::from_secs(900)));
    let early = times
        .iter()
        .filter(|t| **t < Duration::from_secs(800))
        .count();
    assert!(
        (40..160).contains(&early),
        "spread, not fixed: {early} of 200 early"
    );
}

#[test]
fn a_leaf_matches_only_the_request_naming_exactly_its_names() {
    let ca = BuiltinCa::generate().unwrap();
    let identity = Identity::new("ingress", "contour");
    let day = Duration::from_secs(24 * 3600);
    let request = LeafRequest::identity(&identity, "cluster.local", day);
    let leaf = ca.issue(&request).unwrap();
    assert!(request.names_match(&leaf));
    // An ingress gateway certificate asked for under the same common name
    // is not that identity's leaf: a replica must not hand the one out
    // for the other.
    let gateway = LeafRequest::ingress_gateway(&crate::catalog::IngressGateway {
        subject_alt_names: vec![request.common_name.clone()],
        validity: day,
        secret_namespace: "ingress".to_owned(),
        secret_name: "gateway".to_owned(),
    });
    assert_eq!(gateway.common_name, request.common_name);
    assert!(!gateway.names_match(&leaf));
    assert!(gateway.names_match(&ca.issue(&gateway).unwrap()));
}

#[test]
fn a_leaf_expiry_is_read_from_the_certificate_and_an_expired_one_refused() {
    let now = SystemTime::now();
    let (valid, _) = pair(
        false,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let not_after = crate::ca::leaf_not_after(&valid, now).unwrap();
    assert!(not_after > now + Duration::from_secs(3500));
    let (expired, _) = pair(
        false,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(60),
    );
    assert!(crate::ca::leaf_not_after(&expired, now)
        .unwrap_err()
        .contains("expired"));
    assert!(crate::ca::leaf_not_after("not a certificate", now).is_err());
}
