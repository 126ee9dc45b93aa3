//! The operator's own identity, tried as an attacker holding its ServiceAccount token would: the
//! chart's admission policy admits exactly the objects the operator builds (server dry-runs as
//! that identity) and denies every way to borrow another ServiceAccount, a cloud identity, a node
//! or another workload's data through them. See README "Security model".

mod common;

use common::*;
use connection_operator::api::Connection;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_operator_identity_cannot_change_a_user_secret_or_write_in_kube_system() {
    ensure_operator_rbac();
    let admin = client().await;
    let ns = TempNamespace::new(&admin).await;
    let operator = operator_client().await;
    let user_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "user-creds", "namespace": ns.name()},
        "stringData": {"refresh_token": "users-own-token", "client_id": "cid"},
    });
    Api::<Secret>::namespaced(admin.clone(), ns.name())
        .patch(
            "user-creds",
            &PatchParams::apply("user").force(),
            &Patch::Apply(&user_secret),
        )
        .await
        .unwrap();
    let as_operator: Api<Secret> = Api::namespaced(operator.clone(), ns.name());
    let denied = |e: kube::Error| match e {
        kube::Error::Api(s) => s.code == 403 || s.code == 422 || s.code == 400,
        _ => false,
    };

    // The policy takes effect within moments of being created: wait for the first denial (of a
    // dry run: a change that landed before would make the next try a no-op, which is allowed).
    let change_data = json!({"data": {"refresh_token": "Zm9yZ2Vk"}});
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    eventually("the admission policy to deny a data change", WAIT, || async {
        as_operator
            .patch("user-creds", &dry_run, &Patch::Merge(&change_data))
            .await
            .err()
    })
    .await;
    let err = as_operator
        .patch("user-creds", &PatchParams::default(), &Patch::Merge(&change_data))
        .await
        .unwrap_err();
    assert!(denied(err), "rejected");
    let other_label = json!({"metadata": {"labels": {"team": "evil"}}});
    let err = as_operator
        .patch("user-creds", &PatchParams::default(), &Patch::Merge(&other_label))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("may only write Secrets it owns"),
        "{err}"
    );
    let annotation = json!({"metadata": {"annotations": {"x": "y"}}});
    assert!(
        as_operator
            .patch("user-creds", &PatchParams::default(), &Patch::Merge(&annotation))
            .await
            .is_err()
    );
    // The watch label alone is allowed.
    let watch_label = json!({"metadata": {"labels": {"crmconnect.io/credentials": "true"}}});
    as_operator
        .patch("user-creds", &PatchParams::default(), &Patch::Merge(&watch_label))
        .await
        .expect("the watch label is metadata only, allowed");
    let data = Api::<Secret>::namespaced(admin.clone(), ns.name())
        .get("user-creds")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(data["refresh_token"].0, b"users-own-token");

    // A Secret that is not its own cannot be created, anywhere; nothing in kube-system at all.
    let loose = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "loose"}, "stringData": {"a": "b"}});
    let loose: Secret = serde_json::from_value(loose).unwrap();
    assert!(as_operator.create(&PostParams::default(), &loose).await.is_err());
    let err = Api::<Secret>::namespaced(operator.clone(), "kube-system")
        .create(&PostParams::default(), &loose)
        .await
        .unwrap_err();
    assert!(denied(err), "kube-system is off limits");
    // Even the watch label, on a Secret in kube-system.
    let victim = format!("crmconnect-victim-{}", &ns.name()[2..]);
    let system_admin: Api<Secret> = Api::namespaced(admin.clone(), "kube-system");
    let mut secret = loose.clone();
    secret.metadata.name = Some(victim.clone());
    system_admin
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let err = Api::<Secret>::namespaced(operator.clone(), "kube-system")
        .patch(&victim, &PatchParams::default(), &Patch::Merge(&watch_label))
        .await
        .unwrap_err();
    let _ = system_admin.delete(&victim, &Default::default()).await;
    assert!(err.to_string().contains("never writes in kube-system"), "{err}");
}

/// The admission policy also bounds the pods the operator's identity may start: a stolen operator
/// token cannot run a pod with another ServiceAccount's token, host access or privileges through a
/// Job or a Deployment, while the Jobs and Deployments the operator builds pass (server dry-run, as
/// the operator's ServiceAccount).
#[tokio::test]
async fn the_operator_identity_cannot_start_pods_with_another_identity_or_host_access() {
    use connection_operator::api::JobRun;
    use connection_operator::controller::children::{RetrieverSettings, retriever_deployment};
    use connection_operator::jobruns::build::batch_job;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::Job;

    ensure_operator_rbac();
    let admin = client().await;
    let ns = TempNamespace::new(&admin).await;
    let operator = operator_client().await;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };

    let run: JobRun = serde_json::from_value(json!({
        "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobRun",
        "metadata": {"name": "acme-a0001", "namespace": ns.name()},
        "spec": {"connection": "acme", "crmJobId": "a0001", "type": "export", "provider": "SalesforceProduction"}
    }))
    .unwrap();
    let template: connection_operator::api::JobTemplateSpec = serde_json::from_value(json!({
        "type": "export",
        "template": {"spec": {
            "initContainers": [{"name": "prepare", "image": "busybox"}],
            "containers": [{"name": "worker", "image": "busybox"}]
        }}
    }))
    .unwrap();
    let job = batch_job(&run, &template, "acme", "https://acme.my.salesforce.com", &[]);
    let jobs: Api<Job> = Api::namespaced(operator.clone(), ns.name());
    let denied = |what: &str, result: Result<Job, kube::Error>| match result {
        // Denied by the policy (the same Job without the change is allowed).
        Err(kube::Error::Api(s)) => assert!(s.message.contains("denied request"), "{what}: {s:?}"),
        other => panic!("{what} was allowed: {other:?}"),
    };
    // The policy takes effect within moments of being created (this binary may have just made it).
    let mut bad = job.clone();
    bad.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .automount_service_account_token = Some(true);
    eventually(
        "the admission policy to deny a Job with a token",
        WAIT,
        || async { jobs.create(&dry_run, &bad).await.is_err().then_some(()) },
    )
    .await;
    jobs.create(&dry_run, &job)
        .await
        .expect("the Job the operator builds for a JobRun is allowed");

    denied("a ServiceAccount token", jobs.create(&dry_run, &bad).await);
    let mut bad = job.clone();
    bad.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .host_network = Some(true);
    denied("hostNetwork", jobs.create(&dry_run, &bad).await);
    let mut bad = job.clone();
    bad.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .init_containers
        .as_mut()
        .unwrap()[0]
        .security_context = None;
    denied(
        "an unrestricted init container",
        jobs.create(&dry_run, &bad).await,
    );
    let mut bad = job.clone();
    bad.metadata.annotations = None;
    denied("a Job of no JobRun", jobs.create(&dry_run, &bad).await);

    // No ServiceAccount named, even without a token: a workload-identity webhook hands cloud
    // credentials to the pods of a named one.
    let pod_spec = |job: &mut Job| job.spec.as_mut().unwrap().template.spec.as_mut().unwrap().clone();
    let with_pod = |f: &dyn Fn(&mut k8s_openapi::api::core::v1::PodSpec)| {
        let mut bad = job.clone();
        let mut pod = pod_spec(&mut bad);
        f(&mut pod);
        bad.spec.as_mut().unwrap().template.spec = Some(pod);
        bad
    };
    let message = |result: Result<Job, kube::Error>| match result {
        Err(kube::Error::Api(s)) => s.message,
        other => panic!("allowed: {other:?}"),
    };
    let bad = with_pod(&|pod| pod.service_account_name = Some("kustomize-controller".into()));
    assert!(
        message(jobs.create(&dry_run, &bad).await).contains("have no ServiceAccount"),
        "a Job's pods may not run as a named ServiceAccount"
    );
    let bad = with_pod(&|pod| pod.service_account = Some("kustomize-controller".into()));
    assert!(message(jobs.create(&dry_run, &bad).await).contains("have no ServiceAccount"));

    // Volumes: the allow-list. Another workload's claim, or another Secret, is denied; emptyDir,
    // configMap and downwardAPI pass.
    let volume =
        |v: serde_json::Value| -> k8s_openapi::api::core::v1::Volume { serde_json::from_value(v).unwrap() };
    for (what, v) in [
        (
            "a PersistentVolumeClaim",
            json!({"name": "data", "persistentVolumeClaim": {"claimName": "postgres-data"}}),
        ),
        (
            "another Secret",
            json!({"name": "other", "secret": {"secretName": "flux-system-token"}}),
        ),
        (
            "an NFS share",
            json!({"name": "nfs", "nfs": {"server": "10.0.0.9", "path": "/"}}),
        ),
        (
            "a projected Secret",
            json!({"name": "p", "projected": {"sources": [{"secret": {"name": "other"}}]}}),
        ),
    ] {
        let bad = with_pod(&|pod| pod.volumes.get_or_insert_with(Vec::new).push(volume(v.clone())));
        assert!(
            message(jobs.create(&dry_run, &bad).await).contains("the volumes of a JobRun's Job are"),
            "{what} is denied"
        );
    }
    let fine = with_pod(&|pod| {
        pod.volumes.get_or_insert_with(Vec::new).extend([
            volume(json!({"name": "scratch", "emptyDir": {}})),
            volume(json!({"name": "config", "configMap": {"name": "worker-config"}})),
            volume(json!({"name": "meta", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}})),
            volume(json!({"name": "both", "projected": {"sources": [{"configMap": {"name": "worker-config"}}]}})),
        ])
    });
    jobs.create(&dry_run, &fine)
        .await
        .expect("emptyDir, configMap, downwardAPI and projected configMaps are allowed");

    // A Job that is not a JobRun's cannot be changed into one (nor changed at all).
    // (The Job the operator builds, without what makes it a JobRun's, as a user's own.)
    let mut foreign = job.clone();
    foreign.metadata.name = Some("backup".into());
    foreign.metadata.labels = None;
    foreign.metadata.annotations = None;
    foreign.spec.as_mut().unwrap().suspend = Some(true);
    Api::<Job>::namespaced(admin.clone(), ns.name())
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let adopt = json!({"metadata": {
        "labels": {"app.kubernetes.io/managed-by": "connection-operator"},
        "annotations": {"crmconnect.io/jobrun": "acme-a0001"}}});
    let patch_dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let err = jobs
        .patch("backup", &patch_dry, &Patch::Merge(&adopt))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("also before an update"), "{err}");
    let err = jobs
        .patch(
            "backup",
            &patch_dry,
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("may only write Jobs of JobRuns"),
        "{err}"
    );

    // A retriever Deployment runs as its own ServiceAccount only.
    let conn = acme(ns.name());
    let deployment = retriever_deployment(&conn, &RetrieverSettings::default(), None, 1);
    let deployments: Api<Deployment> = Api::namespaced(operator.clone(), ns.name());
    deployments
        .create(&dry_run, &deployment)
        .await
        .expect("the retriever Deployment the operator builds is allowed");
    let mut bad = deployment.clone();
    bad.spec.template.spec.as_mut().unwrap().service_account_name = Some("default".into());
    let err = deployments.create(&dry_run, &bad).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("ServiceAccount of the Deployment's own name"),
        "{err}"
    );
    // Named after a privileged ServiceAccount, and running as it: denied by name.
    let mut bad = deployment.clone();
    bad.metadata.name = Some("kustomize-controller".into());
    bad.spec.template.spec.as_mut().unwrap().service_account_name = Some("kustomize-controller".into());
    let err = deployments.create(&dry_run, &bad).await.unwrap_err();
    assert!(
        err.to_string().contains("is named <connection>-retriever"),
        "{err}"
    );
    // It runs the retriever and nothing else.
    let retriever_only = |what: &str, f: &dyn Fn(&mut k8s_openapi::api::core::v1::PodSpec)| {
        let mut bad = deployment.clone();
        f(bad.spec.template.spec.as_mut().unwrap());
        let deployments = &deployments;
        let what = what.to_string();
        async move { assert_denied(deployments, &what, &bad, "runs the retriever only").await }
    };
    retriever_only("another image", &|pod| {
        pod.containers[0].image = Some("evil/miner:1".into())
    })
    .await;
    retriever_only("a command", &|pod| {
        pod.containers[0].command = Some(vec!["/bin/sh".into()])
    })
    .await;
    retriever_only("other arguments", &|pod| {
        pod.containers[0].args = Some(vec!["run".into()])
    })
    .await;
    retriever_only("a second container", &|pod| {
        let mut c = pod.containers[0].clone();
        c.name = "second".into();
        pod.containers.push(c)
    })
    .await;
    retriever_only("a PersistentVolumeClaim", &|pod| {
        pod.volumes.get_or_insert_with(Vec::new).push(
            serde_json::from_value(
                json!({"name": "data", "persistentVolumeClaim": {"claimName": "postgres-data"}}),
            )
            .unwrap(),
        )
    })
    .await;
    retriever_only("another Secret in the environment", &|pod| {
        pod.containers[0].env.get_or_insert_with(Vec::new).push(
            serde_json::from_value(
                json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}),
            )
            .unwrap(),
        )
    })
    .await;
    let mut bad = deployment.clone();
    bad.spec.template.metadata.as_mut().unwrap().annotations =
        Some([("iam.amazonaws.com/role".to_string(), "admin".to_string())].into());
    let err = deployments.create(&dry_run, &bad).await.unwrap_err();
    assert!(
        err.to_string().contains("runs the retriever only"),
        "pod annotations: {err}"
    );

    let mut bad = deployment.clone();
    let volumes = bad
        .spec
        .template
        .spec
        .as_mut()
        .unwrap()
        .volumes
        .get_or_insert_with(Vec::new);
    volumes.push(serde_json::from_value(json!({"name": "root", "hostPath": {"path": "/"}})).unwrap());
    let err = deployments.create(&dry_run, &bad).await.unwrap_err();
    assert!(err.to_string().contains("run restricted"), "{err}");
}

/// Creates `object` with a server dry-run (as `api`'s identity) and asserts the admission policy
/// denies it, saying `message`.
async fn assert_denied<K>(api: &Api<K>, what: &str, object: &K, message: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let err = api.create(&dry_run, object).await.unwrap_err();
    assert!(err.to_string().contains(message), "{what}: {err}");
}

/// The Connection `acme` of `ns` (with a UID, for owner references), as the operator sees it.
fn acme(ns: &str) -> Connection {
    let mut conn = Connection::new(
        "acme",
        connection_operator::api::ConnectionSpec::new(
            "sales",
            connection_operator::api::Provider::SalesforceProduction,
            "creds",
        ),
    );
    conn.metadata.namespace = Some(ns.to_string());
    conn.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    conn
}

/// A stolen operator token cannot mint a ServiceAccount token (a `kubernetes.io/service-account-token`
/// Secret is filled in by the token controller, and the operator may read Secrets), give its
/// retriever ServiceAccount a cloud identity, or bind the retriever role to someone else; the
/// Secrets, ServiceAccount and RoleBinding it builds pass (server dry-runs as its identity).
#[tokio::test]
async fn the_operator_identity_cannot_mint_service_account_tokens_or_bind_other_subjects() {
    use connection_operator::controller::children::{
        RetrieverSettings, SessionData, retriever_role_binding, retriever_service_account, session_secret,
    };
    use connection_operator::controller::tokens::new_token_secret;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::RoleBinding;

    ensure_operator_rbac();
    let admin = client().await;
    let ns = TempNamespace::new(&admin).await;
    let operator = operator_client().await;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let conn = acme(ns.name());
    let secrets: Api<Secret> = Api::namespaced(operator.clone(), ns.name());
    let session = session_secret(
        &conn,
        &SessionData {
            access_token: "00D!access".into(),
            instance_url: "https://acme.my.salesforce.com".into(),
            expires_at: None,
            ca_bundle: None,
            annotations: [("crmconnect.io/validated".to_string(), "x".to_string())].into(),
        },
    );
    let denied_secret = |what: &'static str, secret: Secret| {
        let secrets = &secrets;
        async move {
            assert_denied(
                secrets,
                what,
                &secret,
                "own Secrets are Opaque, named <connection>-token or <connection>-session",
            )
            .await
        }
    };
    // The policy takes effect within moments of being created: wait for the first denial.
    let mut token_secret = session.clone();
    token_secret.type_ = Some("kubernetes.io/service-account-token".into());
    token_secret.data = None;
    token_secret.metadata.annotations = Some(
        [(
            "kubernetes.io/service-account.name".to_string(),
            "default".to_string(),
        )]
        .into(),
    );
    eventually("the admission policy to deny a token Secret", WAIT, || async {
        secrets
            .create(&dry_run, &token_secret)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    denied_secret("a ServiceAccount token Secret", token_secret).await;
    secrets
        .create(&dry_run, &session)
        .await
        .expect("the session Secret the operator builds is allowed");
    secrets
        .create(&dry_run, &new_token_secret(&conn, "5Aep-live", "seedhash", None))
        .await
        .expect("the token Secret the operator builds is allowed");
    let mut bad = session.clone();
    bad.metadata.name = Some("kustomize-controller-token".into());
    denied_secret("a Secret not named after its connection", bad).await;
    let mut bad = session.clone();
    bad.type_ = Some("kubernetes.io/dockerconfigjson".into());
    bad.data = Some(
        [(
            ".dockerconfigjson".to_string(),
            k8s_openapi::ByteString(b"{}".to_vec()),
        )]
        .into(),
    );
    denied_secret("another type", bad).await;
    let mut bad = session.clone();
    bad.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/service-account.name".into(), "default".into());
    denied_secret("a kubernetes.io annotation", bad).await;

    // The retriever's ServiceAccount: its own name, no cloud identity.
    let accounts: Api<ServiceAccount> = Api::namespaced(operator.clone(), ns.name());
    let account = retriever_service_account(&conn);
    accounts
        .create(&dry_run, &account)
        .await
        .expect("the retriever ServiceAccount the operator builds is allowed");
    let denied_account = |what: &'static str, account: ServiceAccount| {
        let accounts = &accounts;
        async move {
            assert_denied(
                accounts,
                what,
                &account,
                "retriever ServiceAccount is named <connection>-retriever",
            )
            .await
        }
    };
    let mut bad = account.clone();
    bad.metadata.annotations = Some(
        [(
            "eks.amazonaws.com/role-arn".to_string(),
            "arn:aws:iam::111122223333:role/admin".to_string(),
        )]
        .into(),
    );
    denied_account("a workload-identity annotation", bad).await;
    let mut bad = account.clone();
    bad.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("azure.workload.identity/use".into(), "true".into());
    denied_account("a workload-identity label", bad).await;
    let mut bad = account.clone();
    bad.metadata.name = Some("kustomize-controller".into());
    denied_account("another name", bad).await;
    let mut bad = account.clone();
    bad.image_pull_secrets = Some(vec![k8s_openapi::api::core::v1::LocalObjectReference {
        name: "registry".into(),
    }]);
    denied_account("image pull Secrets", bad).await;

    // Its RoleBinding: the retriever role, to that ServiceAccount only.
    let bindings: Api<RoleBinding> = Api::namespaced(operator.clone(), ns.name());
    let binding = retriever_role_binding(&conn, &RetrieverSettings::default());
    bindings
        .create(&dry_run, &binding)
        .await
        .expect("the retriever RoleBinding the operator builds is allowed");
    let mut bad = binding.clone();
    bad.subjects.as_mut().unwrap()[0].name = "default".into();
    let only_ours = "binds the retriever ClusterRole to the ServiceAccount";
    assert_denied(&bindings, "another subject", &bad, only_ours).await;
    let mut bad = binding.clone();
    bad.subjects
        .as_mut()
        .unwrap()
        .push(k8s_openapi::api::rbac::v1::Subject {
            kind: "Group".into(),
            name: "system:authenticated".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        });
    assert_denied(&bindings, "a second subject", &bad, only_ours).await;
}
