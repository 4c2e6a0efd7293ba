//! Rows for `COPY … FROM STDIN (FORMAT binary)`: how a batch inserts many new rows into a table
//! in one statement without the per-row cost of array parameters and `unnest`.
//!
//! The format (Postgres docs, "COPY — Binary Format"): a header, then per row a 16-bit field count
//! and per field a 32-bit length (-1 for NULL) and the value in the type's binary "send" form,
//! then a trailer of -1.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

/// Microseconds from the Unix epoch to Postgres's (2000-01-01T00:00:00Z).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Rows of one table being encoded.
pub(crate) struct BinaryRows {
    buf: Vec<u8>,
    fields: i16,
    rows: usize,
}

impl BinaryRows {
    pub fn new(fields: i16) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        BinaryRows {
            buf,
            fields,
            rows: 0,
        }
    }

    /// Starts a row; exactly `fields` values must follow.
    pub fn row(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&self.fields.to_be_bytes());
        self.rows += 1;
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // A field longer than 2 GiB cannot be sent; no value of these read models comes close.
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn uuid(&mut self, v: Uuid) -> &mut Self {
        self.field(v.as_bytes())
    }

    pub fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    pub fn int4(&mut self, v: i32) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// Microseconds since 2000-01-01T00:00:00Z.
    pub fn timestamptz(&mut self, v: DateTime<Utc>) -> &mut Self {
        self.int8(v.timestamp_micros() - PG_EPOCH_MICROS)
    }

    /// Days since 2000-01-01.
    pub fn date(&mut self, v: NaiveDate) -> &mut Self {
        let epoch = NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default();
        let days = (v - epoch).num_days();
        self.int4(i32::try_from(days).unwrap_or(i32::MAX))
    }

    /// A `jsonb` value from its JSON text: version 1, then the text.
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        let len = i32::try_from(json.len() + 1).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self
    }

    /// Sends the rows with `COPY <target> FROM STDIN (FORMAT binary)`, `target` being the table
    /// and its column list, unqualified (it resolves through `search_path`). Nothing is sent for
    /// no rows.
    pub async fn copy(
        mut self,
        tx: &mut Transaction<'_, Postgres>,
        target: &str,
    ) -> Result<u64, sqlx::Error> {
        if self.rows == 0 {
            return Ok(0);
        }
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        let conn: &mut PgConnection = tx;
        let mut copy = conn
            .copy_in_raw(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
            .await?;
        copy.send(self.buf).await?;
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(rows: &BinaryRows) -> &[u8] {
        // After the 19-byte header.
        &rows.buf[19..]
    }

    #[test]
    fn the_header_is_postgres_binary_copy() {
        let rows = BinaryRows::new(1);
        assert_eq!(&rows.buf[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(rows.buf.len(), 19);
    }

    #[test]
    fn instants_and_days_count_from_2000_01_01() {
        let mut rows = BinaryRows::new(3);
        let epoch = DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
            .unwrap_or_else(|e| panic!("{e}"))
            .to_utc();
        rows.row()
            .timestamptz(epoch + chrono::Duration::microseconds(1))
            .date(NaiveDate::from_ymd_opt(2000, 1, 2).unwrap_or_default())
            .date(NaiveDate::from_ymd_opt(1999, 12, 31).unwrap_or_default());
        let mut want = Vec::new();
        want.extend_from_slice(&3i16.to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&1i64.to_be_bytes());
        want.extend_from_slice(&4i32.to_be_bytes());
        want.extend_from_slice(&1i32.to_be_bytes());
        want.extend_from_slice(&4i32.to_be_bytes());
        want.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(fields(&rows), want);
    }

    #[test]
    fn jsonb_is_version_one_then_the_text() {
        let mut rows = BinaryRows::new(1);
        rows.row().jsonb("{}");
        let mut want = Vec::new();
        want.extend_from_slice(&1i16.to_be_bytes());
        want.extend_from_slice(&3i32.to_be_bytes());
        want.extend_from_slice(b"\x01{}");
        assert_eq!(fields(&rows), want);
    }
}
