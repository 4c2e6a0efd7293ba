-- The live stream reads a venue's bookings by the position of their last change.
CREATE INDEX rm_bookings_changes ON rm_bookings (venue_id, position);
