//! Money: integer minor units and an ISO 4217 currency. No floats anywhere near amounts.

use crate::DomainError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Active ISO 4217 alphabetic codes. A typo like `EUR ` or `EURO` must not become a new currency.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN \
BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP \
GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP \
LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK \
PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND \
TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

/// An ISO 4217 currency code, validated on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, DomainError> {
        let bytes = code.as_bytes();
        if bytes.len() == 3
            && bytes.iter().all(u8::is_ascii_uppercase)
            && ISO_4217.split_ascii_whitespace().any(|c| c == code)
        {
            Ok(Currency([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(DomainError::validation(
                "currency",
                "must be an ISO 4217 code such as EUR",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII uppercase letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Currency {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Currency::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

/// A strictly positive amount in minor units (cents): every payment amount the contract accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    pub fn new(minor: i64) -> Result<Self, DomainError> {
        if minor > 0 {
            Ok(Amount(minor))
        } else {
            Err(DomainError::validation(
                "amount_minor",
                "must be a positive integer number of minor units",
            ))
        }
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = DomainError;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Amount::new(v)
    }
}

impl From<Amount> for i64 {
    fn from(a: Amount) -> i64 {
        a.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_currencies_parse_and_others_are_refused() {
        assert_eq!(
            Currency::parse("EUR").map(|c| c.to_string()),
            Ok("EUR".into())
        );
        assert!(Currency::parse("JPY").is_ok());
        for bad in ["eur", "EURO", "EU", "", "XYZ", "€"] {
            assert!(Currency::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn amounts_must_be_positive() {
        assert!(Amount::new(1).is_ok());
        assert!(Amount::new(0).is_err());
        assert!(Amount::new(-5).is_err());
    }

    #[test]
    fn currency_round_trips_through_json() {
        let c: Currency = serde_json::from_str("\"GBP\"").unwrap_or(Currency(*b"XXX"));
        assert_eq!(c.as_str(), "GBP");
        assert!(serde_json::from_str::<Currency>("\"GBX\"").is_err());
    }
}
