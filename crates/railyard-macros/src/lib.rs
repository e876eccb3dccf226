//! `#[railyard_test::test]`: a thin attribute that hands the test body to
//! `railyard_test::run`, where all the logic lives. Use it through the
//! `railyard` crate (feature `testing`).

use proc_macro::TokenStream;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, ItemFn, Lit, Meta, Token};

/// Runs an `async fn name(db: railyard::Database)` test against real PostgreSQL,
/// inside a transaction that is rolled back at the end.
///
/// Options:
/// - `isolation = "database"`: a fresh database cloned from the migrated
///   template, for tests that must commit (dropped after success, kept after a
///   failure);
/// - `stale_replica`: replica reads without a causal token go to a second
///   connection that cannot see the test's uncommitted writes;
/// - `migrations = "dir"`: the migrations directory, relative to the crate's
///   manifest (defaults to `migrations`);
/// - `lock_timeout = "30s"`: how long the test's work may be held up by other
///   tests' locks before it fails naming them (defaults to
///   `RAILYARD_TEST_LOCK_TIMEOUT`, else 10 s).
#[proc_macro_attribute]
pub fn test(args: TokenStream, item: TokenStream) -> TokenStream {
    match expand(args.into(), item) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

// Long by design: the options are parsed and the test emitted in one `quote!`, so the generated code reads in one place.
fn expand(
    args: proc_macro2::TokenStream,
    item: TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let func: ItemFn = syn::parse(item)?;
    if func.sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            func.sig.fn_token,
            "#[railyard_test::test] needs an `async fn name(db: railyard::Database)`",
        ));
    }
    if func.sig.inputs.len() != 1 {
        return Err(syn::Error::new_spanned(
            &func.sig.inputs,
            "#[railyard_test::test] functions take exactly one argument: the `railyard::Database`",
        ));
    }
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    let mut isolation = quote!(::railyard_test::Isolation::Transaction);
    let mut stale_replica = false;
    let mut migrations = String::from("migrations");
    let mut lock_timeout = quote!(::core::option::Option::None);
    for meta in metas {
        match &meta {
            Meta::Path(p) if p.is_ident("stale_replica") => stale_replica = true,
            Meta::NameValue(nv) if nv.path.is_ident("isolation") => match string(&nv.value)?
                .as_str()
            {
                "transaction" => isolation = quote!(::railyard_test::Isolation::Transaction),
                "database" => isolation = quote!(::railyard_test::Isolation::Database),
                other => {
                    return Err(syn::Error::new_spanned(
                        &nv.value,
                        format!("unknown isolation {other:?}: use \"transaction\" or \"database\""),
                    ));
                }
            },
            Meta::NameValue(nv) if nv.path.is_ident("migrations") => {
                migrations = string(&nv.value)?
            }
            Meta::NameValue(nv) if nv.path.is_ident("lock_timeout") => {
                let text = string(&nv.value)?;
                let d = humantime::parse_duration(&text).map_err(|e| {
                    syn::Error::new_spanned(
                        &nv.value,
                        format!("lock_timeout {text:?}: {e} (write it like \"10s\" or \"1500ms\")"),
                    )
                })?;
                if d.is_zero() {
                    return Err(syn::Error::new_spanned(
                        &nv.value,
                        "lock_timeout must be longer than zero",
                    ));
                }
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                lock_timeout = quote!(::core::option::Option::Some(
                    ::core::time::Duration::from_millis(#ms)
                ));
            }
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    "unknown option: use isolation = \"transaction\" | \"database\", stale_replica, migrations = \"dir\", lock_timeout = \"10s\"",
                ));
            }
        }
    }
    let attrs = &func.attrs;
    let vis = &func.vis;
    let name = &func.sig.ident;
    let mut inner = func.clone();
    inner.attrs.clear();
    inner.vis = syn::Visibility::Inherited;
    inner.sig.ident = syn::Ident::new("__railyard_test_body", name.span());
    Ok(quote! {
        #[::core::prelude::v1::test]
        #(#attrs)*
        #vis fn #name() {
            #inner
            use ::railyard_test::__diesel_migrations as diesel_migrations;
            const __RAILYARD_MIGRATIONS: diesel_migrations::EmbeddedMigrations =
                diesel_migrations::embed_migrations!(#migrations);
            ::railyard_test::run(
                ::railyard_test::TestOptions {
                    name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                    isolation: #isolation,
                    stale_replica: #stale_replica,
                    migrations: || ::railyard::Migrator::new(__RAILYARD_MIGRATIONS),
                    lock_timeout: #lock_timeout,
                },
                __railyard_test_body,
            );
        }
    })
}

fn string(e: &Expr) -> syn::Result<String> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s.value()),
        other => Err(syn::Error::new_spanned(other, "expected a string literal")),
    }
}
