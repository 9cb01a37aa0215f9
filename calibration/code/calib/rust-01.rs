//! A tiny stack-based virtual machine.
//!
//! Programs are lists of instructions; `run` executes them and returns the
//! final top of stack.  Jumps use absolute instruction indices.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Push(i64),
    Add,
    Sub,
    Mul,
    Div,
    Dup,
    Pop,
    /// Jump to the target if the popped value is zero.
    JumpIfZero(usize),
    Jump(usize),
    Print,
    Halt,
}

#[derive(Debug, PartialEq)]
pub enum VmError {
    StackUnderflow { pc: usize },
    DivideByZero { pc: usize },
    BadJump { pc: usize, target: usize },
    StepLimit,
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::StackUnderflow { pc } => write!(f, "stack underflow at {pc}"),
            VmError::DivideByZero { pc } => write!(f, "divide by zero at {pc}"),
            VmError::BadJump { pc, target } => write!(f, "jump from {pc} to {target} is out of range"),
            VmError::StepLimit => write!(f, "step limit reached"),
        }
    }
}

impl std::error::Error for VmError {}

pub struct Vm {
    stack: Vec<i64>,
    pub output: Vec<i64>,
    max_steps: usize,
}

impl Vm {
    pub fn new() -> Self {
        Vm { stack: Vec::with_capacity(64), output: Vec::new(), max_steps: 100_000 }
    }

    fn pop(&mut self, pc: usize) -> Result<i64, VmError> {
        self.stack.pop().ok_or(VmError::StackUnderflow { pc })
    }

    pub fn run(&mut self, program: &[Op]) -> Result<Option<i64>, VmError> {
        let mut pc = 0;
        let mut steps = 0;
        while pc < program.len() {
            steps += 1;
            if steps > self.max_steps {
                return Err(VmError::StepLimit);
            }
            let mut next = pc + 1;
            match program[pc] {
                Op::Push(v) => self.stack.push(v),
                Op::Add | Op::Sub | Op::Mul | Op::Div => {
                    let b = self.pop(pc)?;
                    let a = self.pop(pc)?;
                    let r = match program[pc] {
                        Op::Add => a.wrapping_add(b),
                        Op::Sub => a.wrapping_sub(b),
                        Op::Mul => a.wrapping_mul(b),
                        _ if b == 0 => return Err(VmError::DivideByZero { pc }),
                        _ => a / b,
                    };
                    self.stack.push(r);
                }
                Op::Dup => {
                    let v = *self.stack.last().ok_or(VmError::StackUnderflow { pc })?;
                    self.stack.push(v);
                }
                Op::Pop => {
                    self.pop(pc)?;
                }
                Op::JumpIfZero(t) | Op::Jump(t) => {
                    if t > program.len() {
                        return Err(VmError::BadJump { pc, target: t });
                    }
                    let take = match program[pc] {
                        Op::Jump(_) => true,
                        _ => self.pop(pc)? == 0,
                    };
                    if take {
                        next = t;
                    }
                }
                Op::Print => {
                    let v = *self.stack.last().ok_or(VmError::StackUnderflow { pc })?;
                    self.output.push(v);
                }
                Op::Halt => break,
            }
            pc = next;
        }
        Ok(self.stack.last().copied())
    }
}

fn main() {
    // Count down from 5 to 1, printing each value.
    let program = [
        Op::Push(5),
        Op::Print,          // 1: loop start
        Op::Push(1),
        Op::Sub,
        Op::Dup,
        Op::JumpIfZero(7),
        Op::Jump(1),
        Op::Halt,           // 7
    ];
    let mut vm = Vm::new();
    match vm.run(&program) {
        Ok(top) => println!("output {:?}, top {:?}", vm.output, top),
        Err(e) => eprintln!("error: {e}"),
    }
}
