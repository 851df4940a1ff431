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

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_are_stripe_shaped() {
        assert!(valid_id("cus_Abc-09", "id").is_ok());
        let too_long = "x".repeat(256);
        for bad in ["", "cus a", "cus/1", "ç", too_long.as_str()] {
            assert!(valid_id(bad, "id").is_err(), "{bad:?}");
        }
    }
}
