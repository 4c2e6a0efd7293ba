//! Query strings, the one way every endpoint reads them.
//!
//! [`QueryParams`] is the only query-string extractor in the API: it never rejects a request by
//! itself (so never with the framework's plain-text rejection); its accessors answer a bad
//! parameter as `400 validation` problem+json whose `field` names the parameter: one given more
//! than once (`?status=a&status=b`), one that is not of its type, one outside its values.
//! Parameters an endpoint does not read are ignored. `min_position` (or the header
//! `X-Ledger-Min-Position`) is read here too, the same way for every query.

use super::problem::ApiError;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use chrono::{DateTime, NaiveDate, Utc};
use std::str::FromStr;
use uuid::Uuid;

/// The query string as its (name, value) pairs, percent-decoded, in order.
#[derive(Debug, Default, Clone)]
pub struct QueryParams {
    pairs: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // Pairs of strings cannot fail to deserialise (decoding is lossy); answer our problem
        // anyway rather than trust that.
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|_| ApiError::bad_request("query", "is not a valid query string"))?;
        Ok(QueryParams { pairs })
    }
}

impl QueryParams {
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        QueryParams { pairs }
    }

    /// The raw value of `name`, if given; given more than once is a 400 (which one would we
    /// use?).
    pub fn text(&self, name: &'static str) -> Result<Option<&str>, ApiError> {
        let mut given = self.pairs.iter().filter(|(k, _)| k == name);
        let first = given.next().map(|(_, v)| v.as_str());
        if given.next().is_some() {
            return Err(ApiError::bad_request(name, "must be given at most once"));
        }
        Ok(first)
    }

    /// `name` parsed as a `T`; `expect` completes "must be …" when it does not parse.
    pub fn parse<T: FromStr>(
        &self,
        name: &'static str,
        expect: &str,
    ) -> Result<Option<T>, ApiError> {
        self.text(name)?
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| ApiError::bad_request(name, format!("must be {expect}")))
            })
            .transpose()
    }

    /// Like [`Self::parse`], and required.
    pub fn required<T: FromStr>(&self, name: &'static str, expect: &str) -> Result<T, ApiError> {
        self.parse(name, expect)?
            .ok_or_else(|| ApiError::bad_request(name, format!("is required: {expect}")))
    }

    /// A whole number in `range`, `default` when absent.
    pub fn number_in(
        &self,
        name: &'static str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> Result<i64, ApiError> {
        let expect = format!("a whole number from {} to {}", range.start(), range.end());
        let n = self.parse(name, &expect)?.unwrap_or(default);
        if !range.contains(&n) {
            return Err(ApiError::bad_request(name, format!("must be {expect}")));
        }
        Ok(n)
    }

    /// A calendar date `YYYY-MM-DD`.
    pub fn date(&self, name: &'static str) -> Result<Option<NaiveDate>, ApiError> {
        self.parse(name, "a date YYYY-MM-DD")
    }

    /// A required calendar date `YYYY-MM-DD`.
    pub fn required_date(&self, name: &'static str) -> Result<NaiveDate, ApiError> {
        self.required(name, "a date YYYY-MM-DD")
    }

    /// An RFC 3339 time with an offset; a bare date or a local time is ambiguous, so refused.
    pub fn time(&self, name: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.text(name)?
            .map(|s| {
                DateTime::parse_from_rfc3339(s.trim())
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::bad_request(name, "must be an RFC 3339 time with an offset")
                    })
            })
            .transpose()
    }

    /// An id (a UUID); `what` names it in the message ("a venue id").
    pub fn uuid(&self, name: &'static str, what: &str) -> Result<Option<Uuid>, ApiError> {
        self.parse(name, what)
    }

    /// One of `allowed`, exactly as spelled there.
    pub fn one_of(
        &self,
        name: &'static str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, ApiError> {
        self.text(name)?
            .map(|s| {
                allowed.iter().copied().find(|a| *a == s).ok_or_else(|| {
                    ApiError::bad_request(name, format!("must be one of {}", allowed.join(", ")))
                })
            })
            .transpose()
    }

    /// The position a query must wait for: `?min_position=N`, else the header
    /// `X-Ledger-Min-Position: N` (the parameter wins when both are given). A global position is
    /// 0 or more.
    pub fn min_position(&self, headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
        const EXPECT: &str = "a global position (a whole number, 0 or more)";
        if let Some(p) = self.parse::<i64>("min_position", EXPECT)? {
            if p < 0 {
                return Err(ApiError::bad_request(
                    "min_position",
                    format!("must be {EXPECT}"),
                ));
            }
            return Ok(Some(p));
        }
        let mut given = headers.get_all("x-ledger-min-position").iter();
        let Some(first) = given.next() else {
            return Ok(None);
        };
        let bad = || ApiError::bad_request("X-Ledger-Min-Position", format!("must be {EXPECT}"));
        if given.next().is_some() {
            return Err(ApiError::bad_request(
                "X-Ledger-Min-Position",
                "must be given at most once",
            ));
        }
        first
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|p| *p >= 0)
            .map(Some)
            .ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn params(pairs: &[(&str, &str)]) -> QueryParams {
        QueryParams::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn field(e: ApiError) -> String {
        match e {
            ApiError::Validation { field, status, .. } => {
                assert_eq!(status, axum::http::StatusCode::BAD_REQUEST);
                field
            }
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn a_parameter_given_twice_is_refused_naming_it() {
        let p = params(&[
            ("limit", "5"),
            ("limit", "6"),
            ("other", "x"),
            ("other", "y"),
        ]);
        assert_eq!(
            p.number_in("limit", 1..=10, 3).err().map(field),
            Some("limit".into())
        );
        // Parameters an endpoint does not read are ignored, repeated or not.
        assert_eq!(p.text("absent").ok(), Some(None));
    }

    #[test]
    fn values_are_typed_and_bounded() {
        let p = params(&[
            ("limit", "0"),
            ("n", "x"),
            ("d", "2030-02-30"),
            ("t", "2030-01-01"),
            ("s", "Pending"),
            ("ok", "pending"),
        ]);
        assert_eq!(
            p.number_in("limit", 1..=10, 3).err().map(field),
            Some("limit".into())
        );
        assert_eq!(p.number_in("missing", 1..=10, 3).ok(), Some(3));
        assert_eq!(
            p.parse::<i64>("n", "a number").err().map(field),
            Some("n".into())
        );
        assert_eq!(p.date("d").err().map(field), Some("d".into()));
        assert_eq!(p.time("t").err().map(field), Some("t".into()));
        assert_eq!(
            p.one_of("s", &["pending"]).err().map(field),
            Some("s".into())
        );
        assert_eq!(p.one_of("ok", &["pending"]).ok(), Some(Some("pending")));
        assert_eq!(
            p.required_date("nope").err().map(field),
            Some("nope".into())
        );
    }

    #[test]
    fn min_position_comes_from_the_parameter_or_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(params(&[]).min_position(&headers).ok(), Some(None));
        headers.insert("x-ledger-min-position", HeaderValue::from_static("7"));
        assert_eq!(params(&[]).min_position(&headers).ok(), Some(Some(7)));
        assert_eq!(
            params(&[("min_position", "9")]).min_position(&headers).ok(),
            Some(Some(9))
        );
        for bad in ["-1", "soon", ""] {
            assert_eq!(
                params(&[("min_position", bad)])
                    .min_position(&HeaderMap::new())
                    .err()
                    .map(field),
                Some("min_position".into()),
                "{bad:?}"
            );
        }
        headers.append("x-ledger-min-position", HeaderValue::from_static("8"));
        assert_eq!(
            params(&[]).min_position(&headers).err().map(field),
            Some("X-Ledger-Min-Position".into())
        );
    }
}
