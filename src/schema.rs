// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Int8,
        user_id -> Int8,
        #[max_length = 3]
        currency -> Bpchar,
        balance_cents -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    deposits (id) {
        id -> Int8,
        account_id -> Int8,
        amount_cents -> Int8,
        idempotency_key -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    fees (id) {
        id -> Int8,
        trade_id -> Int8,
        account_id -> Int8,
        amount_cents -> Int8,
        rebated_cents -> Int8,
    }
}

diesel::table! {
    orders (id) {
        id -> Int8,
        account_id -> Int8,
        symbol -> Text,
        side -> Text,
        quantity -> Int8,
        filled_quantity -> Int8,
        limit_price_cents -> Int8,
        status -> Text,
        created_at -> Timestamptz,
        client_order_id -> Nullable<Text>,
    }
}

diesel::table! {
    positions (account_id, symbol) {
        account_id -> Int8,
        symbol -> Text,
        quantity -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    symbols (symbol) {
        symbol -> Text,
        reference_price_cents -> Int8,
    }
}

diesel::table! {
    trades (id, executed_at) {
        id -> Int8,
        buy_order_id -> Int8,
        sell_order_id -> Int8,
        symbol -> Text,
        quantity -> Int8,
        price_cents -> Int8,
        executed_at -> Timestamptz,
    }
}

diesel::table! {
    users (id) {
        id -> Int8,
        email -> Text,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::joinable!(accounts -> users (user_id));
diesel::joinable!(deposits -> accounts (account_id));
diesel::joinable!(fees -> accounts (account_id));
diesel::joinable!(orders -> accounts (account_id));
diesel::joinable!(positions -> accounts (account_id));

diesel::allow_tables_to_appear_in_same_query!(
    accounts, deposits, fees, orders, positions, symbols, trades, users,
);
