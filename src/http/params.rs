//! Checks of request parameters that every handler shares, so that no handler imports
//! another to reach them. They only say whether a value is acceptable (a 400 otherwise);
//! they never look anything up.

use super::ApiError;

/// Stripe-shaped ids: letters, digits, `_` and `-`, at most 255 characters.
pub fn valid_id(id: &str, what: &'static str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidParameter(what))
    }
}

/// Feature names as the catalogue writes them (`api`, `projects:3`, `export.csv`):
/// letters, digits, `_`, `-`, `.` and `:`, at most 255 characters.
pub fn valid_feature(feature: &str) -> Result<(), ApiError> {
    let ok = !feature.is_empty()
        && feature.len() <= 255
        && feature
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidParameter("feature"))
    }
}

#[cfg(test)]
mod tests {
    use super::{valid_feature, valid_id};

    #[test]
    fn features_are_catalogue_shaped() {
        for good in ["api", "projects:3", "export.csv", "a-b_c"] {
            assert!(valid_feature(good).is_ok(), "{good:?}");
        }
        let too_long = "f".repeat(256);
        for bad in ["", "a b", "a/b", "é", too_long.as_str()] {
            assert!(valid_feature(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_stripe_shaped() {
        assert!(valid_id("cus_Abc-09", "id").is_ok());
        let too_long = "x".repeat(256);
        for bad in ["", "cus a", "cus/1", "ç", too_long.as_str()] {
            assert!(valid_id(bad, "id").is_err(), "{bad:?}");
        }
    }
}
